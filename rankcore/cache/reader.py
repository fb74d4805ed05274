"""Open a cache for reading: its metadata as one Arrow table, and volumes one at a time.

Only the shards listed in the manifest are read; each is checked (size and footer, or the
whole file's checksum with ``verify=True``) and its data pages carry checksums, so a corrupt
shard raises an InputError that says to re-run ingest (which rebuilds it) instead of being
read silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankcore.cache.layout import CacheLayout, Manifest, find_layout, read_config, read_manifest
from rankcore.cache.schema import CACHE_SCHEMA, METADATA_COLUMNS, decode_tissue, decode_volume
from rankcore.cache.shards import open_shard, read_shard_metadata, verify_shard
from rankcore.errors import IncompleteCacheError, InputError
from rankcore.mri.tissue_names import TISSUE_FEATURES
from rankcore.mri.types import PreprocessConfig


def _corrupt(layout: CacheLayout, name: str, problem: str) -> InputError:
    return InputError(f"cache shard {name} in {str(layout.folder)!r} is corrupt ({problem}); "
                      f"run `brainrank ingest` again to rebuild it")


@dataclass(frozen=True)
class CacheView:
    """The metadata of a cache, one row per subject-session, sorted by ``key``.

    Attributes:
        layout: the cache folder's paths.
        config: the PreprocessConfig that filled it.
        manifest: the accepted shards.
        table: every column but ``volume`` (CACHE_SCHEMA order).
        shards: per row, the file name of the shard holding its volume.
        row_groups: per row, the row group of that shard (one row per row group).
    """

    layout: CacheLayout
    config: PreprocessConfig
    manifest: Manifest
    table: pa.Table
    shards: tuple[str, ...]
    row_groups: tuple[int, ...]

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def keys(self) -> list[str]:
        """``participant_id`` or ``participant_id/session`` of every row."""
        return self.table.column("key").to_pylist()

    @property
    def splits(self) -> list[str]:
        """The distinct non-null ``split`` values, sorted."""
        return sorted(v for v in pc.unique(self.table.column("split")).to_pylist()
                      if v is not None)

    @property
    def shard_paths(self) -> list[Path]:
        """Paths of the accepted shard files, in commit order."""
        return [self.layout.shard_path(s.name) for s in self.manifest.shards]

    def select(self, split: str | Sequence[str] | None) -> CacheView:
        """The rows whose ``split`` is ``split`` (or one of them); all rows for None."""
        if split is None:
            return self
        wanted = [split] if isinstance(split, str) else list(split)
        known = self.splits
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise InputError(f"`split` must be one of {known} for this cache, got {unknown}")
        mask = pc.is_in(self.table.column("split"), value_set=pa.array(wanted, pa.string()))
        idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        return CacheView(self.layout, self.config, self.manifest,
                         self.table.take(pa.array(idx, pa.int64())),
                         tuple(self.shards[i] for i in idx),
                         tuple(self.row_groups[i] for i in idx))

    @property
    def has_tissue(self) -> bool:
        """Whether the rows carry tissue channels and features (``config.tissue``)."""
        return bool(self.config.tissue)

    def _read_cell(self, i: int, column: str, pf: pq.ParquetFile | None) -> pa.Buffer:
        """The bytes of ``column`` in row ``i`` (one row group of a memory-mapped shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        name = self.shards[i]
        if pf is None:
            pf = open_shard(self.layout.shard_path(name))
        try:
            part = pf.read_row_group(self.row_groups[i], columns=["key", column])
        except (OSError, pa.ArrowException) as exc:
            raise _corrupt(self.layout, name, str(exc)) from None
        key = self.table.column("key")[i].as_py()
        if part.num_rows != 1 or part.column("key")[0].as_py() != key:
            raise _corrupt(self.layout, name, f"row group {self.row_groups[i]} does not hold "
                                              f"{key!r}")
        cell = part.column(column)[0]
        if not cell.is_valid:
            raise _corrupt(self.layout, name, f"row {key!r} has no {column!r}")
        return cell.as_buffer()

    def read_volume(self, i: int, pf: pq.ParquetFile | None = None) -> np.ndarray:
        """Volume of row ``i`` as stored (float16 or float32, shape ``config.shape``).

        Reads one row group (one page of the volume column) from a memory-mapped file.
        ``pf`` is an already opened ``open_shard`` of the row's shard.
        """
        buf = self._read_cell(i, "volume", pf)
        shape = self.table.column("shape")[i].as_py()
        dtype = self.table.column("volume_dtype")[i].as_py()
        return decode_volume(buf, shape, dtype)

    def read_tissue(self, i: int, pf: pq.ParquetFile | None = None) -> np.ndarray:
        """GM, WM, CSF probabilities of row ``i``: float32 (3, X, Y, Z) in [0, 1].

        Raises:
            InputError: the cache has no tissue (``config.tissue`` off).
        """
        if not self.has_tissue:
            raise InputError(f"cache {str(self.layout.folder)!r} must hold tissue channels "
                             f"(ingest with `tissue` on), got a cache without them")
        buf = self._read_cell(i, "tissue", pf)
        return decode_tissue(buf, self.table.column("shape")[i].as_py())

    def tissue_features(self) -> np.ndarray:
        """(N, F) float64 tissue features (F = len(TISSUE_FEATURES); F = 0 without tissue)."""
        if not self.has_tissue:
            return np.zeros((len(self), 0), dtype=np.float64)
        out = np.full((len(self), len(TISSUE_FEATURES)), np.nan, dtype=np.float64)
        for r, values in enumerate(self.table.column("tissue_features").to_pylist()):
            if values is not None and len(values) == len(TISSUE_FEATURES):
                out[r] = values
        return out


def open_cache(cache_dir: str | Path, config: PreprocessConfig | None = None, *,
               verify: bool = False) -> CacheView:
    """Open the cache of ``config`` under ``cache_dir`` (its only config when None).

    Loads the metadata of every accepted shard (no volume bytes are read).

    Args:
        cache_dir: the cache root given to ingest.
        config: which preprocessing config's cache; None when there is only one.
        verify: also check every shard's checksum against the manifest (reads all bytes).

    Raises:
        InputError: no cache, several configs and none chosen, or a corrupt shard.
    """
    layout = find_layout(cache_dir, config)
    manifest = read_manifest(layout)
    stored = read_config(layout)
    tables, shards, groups = [], [], []
    for info in sorted(manifest.shards, key=lambda s: s.seq):
        problem = verify_shard(layout, info, full=verify)
        if problem is not None:
            raise _corrupt(layout, info.name, problem)
        try:
            t = read_shard_metadata(layout.shard_path(info.name), METADATA_COLUMNS)
        except (OSError, pa.ArrowException) as exc:
            raise _corrupt(layout, info.name, str(exc)) from None
        tables.append(t)
        shards += [info.name] * t.num_rows
        groups += range(t.num_rows)
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = CACHE_SCHEMA.empty_table().select(list(METADATA_COLUMNS))
    # An interrupted ingest can leave a key in two shards: the later one wins. Then sort by key.
    keys = table.column("key").to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    order = sorted(last.values(), key=lambda i: keys[i])
    return CacheView(layout, stored, manifest, table.take(pa.array(order, pa.int64())),
                     tuple(shards[i] for i in order), tuple(groups[i] for i in order))


def check_complete(cache_dir: str | Path, config: PreprocessConfig | None = None, *,
                   allow_incomplete: bool = False) -> str | None:
    """Refuse a cache whose ingest was interrupted (its manifest says ``complete: false``).

    Such a cache holds only the subjects ingested before the interruption (and may hold a
    subject twice), so training or evaluating on it silently uses part of the cohort.

    Args:
        cache_dir: the cache root.
        config: which preprocessing config's cache; None when there is only one.
        allow_incomplete: accept it anyway; the returned warning says what is used.

    Returns:
        None for a complete cache, else (with ``allow_incomplete``) a one-line warning.

    Raises:
        IncompleteCacheError: an incomplete cache and ``allow_incomplete`` is False.
        InputError: no cache there (as :func:`find_layout`), or an unreadable manifest.
    """
    layout = find_layout(cache_dir, config)
    manifest = read_manifest(layout)
    if manifest.complete:
        return None
    rows = sum(s.rows for s in manifest.shards)
    what = (f"cache {str(layout.folder)!r} is incomplete: its ingest was interrupted "
            f"(manifest.json says `complete: false`; {rows} row(s) in "
            f"{len(manifest.shards)} shard(s) so far)")
    if not allow_incomplete:
        raise IncompleteCacheError(f"{what}; run `brainrank ingest` on the cohort again to "
                                   "finish it (or pass --allow-incomplete-cache to use it as "
                                   "it is)")
    return f"{what}; using it anyway (--allow-incomplete-cache): results cover only these rows"
