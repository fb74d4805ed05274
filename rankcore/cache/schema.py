"""The cache's Arrow schemas, defined once, and the conversions between rows and volumes.

One row per subject-session. The preprocessed volume is stored as the raw little-endian bytes
of a C-ordered array (``volume_dtype``, shape ``shape``) in a ``binary`` column: uncompressed,
PLAIN-encoded, one row per row group, so that one subject is read by decoding exactly one
page, straight out of a memory-mapped file, and turned into an array with ``np.frombuffer``
(no per-element list decoding, as a list<float16> column would need).

With ``PreprocessConfig.tissue`` on, two more columns hold the tissue of each row: ``tissue``,
the GM, WM and CSF probabilities as raw C-order bytes of a uint8 (3, X, Y, Z) array
(probability = value / 255, :data:`TISSUE_LEVELS`), and ``tissue_features``, the features
named by ``TISSUE_FEATURES`` (recorded in the schema metadata as
``brainrank.tissue_features``). Both are null when tissue is off.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa

from rankcore.errors import InputError
from rankcore.mri.tissue_names import CLASSES, TISSUE_FEATURES
from rankcore.mri.types import CohortRow, PreprocessConfig, PreprocessedVolume, QuarantineEntry

#: Bumped when a column changes meaning; written into every shard's schema metadata.
SCHEMA_VERSION = "2"

#: Quantisation of the stored tissue probabilities: uint8 value v means v / TISSUE_LEVELS.
TISSUE_LEVELS = 255

#: Scalar features computed during preprocessing (float columns, null when absent).
FEATURE_COLUMNS = ("brain_volume_ml", "p01", "p50", "p99")

#: Columns that come from the cohort table, not the image; updated in place on relabelling.
LABEL_COLUMNS = ("participant_id", "session", "age", "age_censored", "sex", "site", "split")

#: Columns describing the source file; updated in place when a file moves or is touched.
SOURCE_STAT_COLUMNS = ("source_path", "source_size", "source_mtime_ns")

CACHE_SCHEMA = pa.schema(
    [
        pa.field("participant_id", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("key", pa.string(), nullable=False),
        pa.field("age", pa.float64()),  # years; null when unknown
        pa.field("age_censored", pa.bool_(), nullable=False),  # BIDS "89+"
        pa.field("sex", pa.string()),
        pa.field("site", pa.string()),
        pa.field("split", pa.string()),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("source_digest", pa.string(), nullable=False),  # sha256 hex of the file bytes
        pa.field("source_size", pa.int64(), nullable=False),  # bytes
        pa.field("source_mtime_ns", pa.int64(), nullable=False),  # st_mtime_ns
        pa.field("preproc_digest", pa.string(), nullable=False),  # PreprocessConfig.digest()
        pa.field("shape", pa.list_(pa.int32()), nullable=False),  # (x, y, z) voxels
        pa.field("spacing", pa.list_(pa.float32()), nullable=False),  # mm
        pa.field("affine", pa.list_(pa.float64()), nullable=False),  # 4x4 row-major, mm
        pa.field("volume_dtype", pa.string(), nullable=False),  # "float16" | "float32"
        pa.field("volume", pa.binary(), nullable=False),  # raw C-order bytes
        pa.field("tissue", pa.binary()),  # uint8 (3, x, y, z) C-order; null: no tissue
        pa.field("tissue_features", pa.list_(pa.float32())),  # TISSUE_FEATURES order
        *(pa.field(name, pa.float64()) for name in FEATURE_COLUMNS),
        pa.field("source_orientation", pa.string()),  # axis codes, e.g. "LAS"
        pa.field("source_spacing", pa.list_(pa.float32())),  # mm
        pa.field("source_shape", pa.list_(pa.int32())),
        pa.field("actions", pa.string()),  # "; "-joined preprocessing steps
        pa.field("brainrank_version", pa.string(), nullable=False),
    ],
    metadata={"brainrank.schema_version": SCHEMA_VERSION,
              "brainrank.tissue_classes": ",".join(CLASSES),
              "brainrank.tissue_features": ",".join(TISSUE_FEATURES)},
)

#: Columns holding a whole volume (read one row at a time, never with the metadata).
VOLUME_COLUMNS = ("volume", "tissue")

#: Every column except the volumes: what metadata readers load.
METADATA_COLUMNS = tuple(name for name in CACHE_SCHEMA.names if name not in VOLUME_COLUMNS)

#: String columns worth dictionary-encoding (few distinct values).
DICTIONARY_COLUMNS = ("session", "sex", "site", "split", "preproc_digest", "volume_dtype",
                      "source_orientation", "brainrank_version")

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("participant_id", pa.string(), nullable=False),
        pa.field("key", pa.string()),  # null for table-level problems without a session key
        pa.field("source", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        # The file's stat when the verdict was reached (null for table-level problems); a rerun
        # reuses the verdict while the stat and brainrank_version are unchanged.
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime_ns", pa.int64()),
        pa.field("brainrank_version", pa.string(), nullable=False),
    ],
    metadata={"brainrank.schema_version": SCHEMA_VERSION},
)

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@functools.cache
def library_version() -> str:
    """The installed brainrank version (``"unknown"`` when run from an uninstalled tree)."""
    try:
        return metadata.version("brainrank")
    except metadata.PackageNotFoundError:  # pragma: no cover - the package is installed in CI
        return "unknown"


@dataclass(frozen=True)
class SourceStat:
    """What the cache remembers about a source file: its bytes' sha256, size and mtime."""

    digest: str
    size: int
    mtime_ns: int


#: torch converts float32 -> float16 in chunks of at most this many values: below its
#: parallel grain size (32768) a conversion never wakes torch's thread pool.
_TORCH_CHUNK = 32_768


def _to_float16(arr: np.ndarray) -> np.ndarray:
    """float32 -> float16, rounding to nearest even: ``arr.astype(np.float16)``, bit for bit
    for every non-NaN value.

    numpy casts one value at a time (~2.5 ns each: ~1.5-3 ms for an 80x96x80 volume); torch's
    vectorised cast takes ~0.1 ms. torch is only used when this process has already imported
    it (ingest workers do not import it for this), on a little-endian machine.
    """
    torch = sys.modules.get("torch")
    if torch is None or sys.byteorder != "little" or arr.size < _TORCH_CHUNK:
        return arr.astype(np.float16)
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if not flat.flags.writeable:  # torch.from_numpy wants a writeable array
        flat = flat.copy()
    src = torch.from_numpy(flat)
    out = torch.empty(src.shape, dtype=torch.float16)
    for i in range(0, src.numel(), _TORCH_CHUNK):
        out[i:i + _TORCH_CHUNK].copy_(src[i:i + _TORCH_CHUNK])
    return out.numpy().reshape(arr.shape)


def encode_volume(data: np.ndarray, dtype: str) -> bytes:
    """Cast a volume to the storage ``dtype`` and return its C-order little-endian bytes.

    float16 saturates at ±65504; values beyond are clipped (z-scored intensities never get
    near it) so that a stored volume is always finite when its input was.
    """
    arr = np.asarray(data, dtype=np.float32)
    if dtype != "float16":
        return np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    # Clipping is rare, so test for it first (min/max cost far less than a clip copy);
    # written so that a NaN (comparisons False) also takes the clipping path.
    if arr.size and not (-_FLOAT16_MAX <= arr.min() and arr.max() <= _FLOAT16_MAX):
        arr = np.clip(arr, -_FLOAT16_MAX, _FLOAT16_MAX)
    return np.ascontiguousarray(_to_float16(arr), dtype=np.dtype("<f2")).tobytes()


def decode_volume(buf: Any, shape: Sequence[int], dtype: str) -> np.ndarray:
    """View stored volume bytes as an array of ``shape`` (no copy; read-only when ``buf`` is).

    Args:
        buf: bytes-like object (``bytes``, ``pyarrow.Buffer``, memoryview).
        shape: (x, y, z) voxel grid.
        dtype: storage dtype name, ``"float16"`` or ``"float32"``.

    Returns:
        Array of ``shape`` and ``dtype``.
    """
    dt = np.dtype(dtype).newbyteorder("<")
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    arr = np.frombuffer(buf, dtype=dt)
    if arr.size != n:
        raise InputError(f"`volume` must hold {n} {dtype} values for shape {shape}, "
                         f"got {arr.size}")
    return arr.reshape(shape)


def encode_tissue(probabilities: np.ndarray) -> bytes:
    """uint8 bytes (C order) of (3, X, Y, Z) probabilities in [0, 1], rounded to 1/255."""
    q = np.rint(np.clip(np.asarray(probabilities, dtype=np.float32), 0.0, 1.0)
                * np.float32(TISSUE_LEVELS))
    return np.ascontiguousarray(q, dtype=np.uint8).tobytes()


def decode_tissue(buf: Any, shape: Sequence[int]) -> np.ndarray:
    """float32 (3, X, Y, Z) probabilities from stored tissue bytes of a (X, Y, Z) ``shape``."""
    full = (len(CLASSES), *(int(s) for s in shape))
    arr = np.frombuffer(buf, dtype=np.uint8)
    if arr.size != int(np.prod(full)):
        raise InputError(f"`tissue` must hold {int(np.prod(full))} uint8 values for shape "
                         f"{full}, got {arr.size}")
    return arr.reshape(full).astype(np.float32) * np.float32(1.0 / TISSUE_LEVELS)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def volume_row(row: CohortRow, pv: PreprocessedVolume, config: PreprocessConfig,
               source: SourceStat) -> dict[str, Any]:
    """One cache row (a dict keyed by CACHE_SCHEMA's names) for a preprocessed subject."""
    data = np.asarray(pv.data)
    if data.shape != tuple(config.shape):
        raise InputError(f"`pv.data` must have the configured shape {tuple(config.shape)}, "
                         f"got {data.shape}")
    affine = np.asarray(pv.affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"`pv.affine` must be a 4x4 matrix, got shape {affine.shape}")
    out: dict[str, Any] = {
        **label_values(row),
        "key": row.key,
        "source_path": str(row.path),
        "source_digest": source.digest,
        "source_size": int(source.size),
        "source_mtime_ns": int(source.mtime_ns),
        "preproc_digest": config.digest(),
        "shape": [int(s) for s in data.shape],
        "spacing": [float(s) for s in pv.spacing],
        "affine": affine.reshape(-1).tolist(),
        "volume_dtype": config.dtype,
        "volume": encode_volume(data, config.dtype),
        "tissue": None,
        "tissue_features": None,
        "source_orientation": _opt_str(pv.source_orientation),
        "source_spacing": [float(s) for s in pv.source_spacing],
        "source_shape": [int(s) for s in pv.source_shape],
        "actions": "; ".join(pv.actions),
        "brainrank_version": library_version(),
    }
    for name in FEATURE_COLUMNS:
        value = pv.features.get(name)
        out[name] = None if value is None else float(value)
    if config.tissue:
        if pv.tissue is None or pv.tissue_features is None:
            raise InputError("`pv` must carry tissue channels and features when "
                             "`config.tissue` is on, got none")
        if pv.tissue.shape != (len(CLASSES), *data.shape):
            raise InputError(f"`pv.tissue` must have shape {(len(CLASSES), *data.shape)}, "
                             f"got {pv.tissue.shape}")
        if len(pv.tissue_features) != len(TISSUE_FEATURES):
            raise InputError(f"`pv.tissue_features` must hold {len(TISSUE_FEATURES)} values, "
                             f"got {len(pv.tissue_features)}")
        out["tissue"] = encode_tissue(pv.tissue)
        out["tissue_features"] = [float(v) for v in pv.tissue_features]
    return out


def label_values(row: CohortRow) -> dict[str, Any]:
    """The LABEL_COLUMNS values of a cohort row."""
    return {
        "participant_id": row.participant_id,
        "session": row.session,
        "age": None if row.age is None else float(row.age),
        "age_censored": bool(row.age_censored),
        "sex": _opt_str(row.sex),
        "site": _opt_str(row.site),
        "split": _opt_str(row.split),
    }


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a CACHE_SCHEMA table from row dicts (validates types and non-null columns)."""
    return pa.Table.from_pylist(list(rows), schema=CACHE_SCHEMA)


def quarantine_table(entries: Sequence[tuple[QuarantineEntry, str | None, int | None,
                                              int | None, str]]) -> pa.Table:
    """QUARANTINE_SCHEMA table from (entry, key, size, mtime_ns, version), sorted for stability."""
    records = [
        {"participant_id": e.participant_id, "key": key, "source": e.source,
         "category": e.category, "message": e.message, "source_size": size,
         "source_mtime_ns": mtime, "brainrank_version": version}
        for e, key, size, mtime, version in entries
    ]
    records.sort(key=lambda r: (r["participant_id"], r["key"] or "", r["source"], r["category"]))
    return pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA)
