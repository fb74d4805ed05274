"""Read one NIfTI-1/2 T1 image with nibabel, checking the header before any voxel is read.

Every problem becomes a :class:`~rankcore.errors.QuarantineError` whose ``category`` is one of
:data:`rankcore.mri.types.QUARANTINE_CATEGORIES` and whose message names the file:

=============  ===========================================================================
category       raised when
=============  ===========================================================================
missing_file   the path does not exist
unreadable     not a single-file NIfTI-1/2 (.nii / .nii.gz), bad gzip stream, header that
               cannot be parsed, non-scalar voxel type, or voxel data shorter than promised
wrong_dims     not 3-D and not 4-D (or more) with every extra dimension of length 1, or a
               spatial dimension shorter than 2 voxels
too_large      the header promises more than ``config.max_voxels`` voxels (refused from the
               header alone: nothing of that size is allocated)
bad_affine     sform_code and qform_code both 0 (see below), an invalid quaternion, or a
               non-finite / singular voxel-to-world matrix
nonfinite      NaN or inf voxels after scaling (``scl_slope``/``scl_inter`` are applied)
empty          every voxel has the same value
=============  ===========================================================================

Missing affine: when both ``sform_code`` and ``qform_code`` are 0, nibabel falls back to a
diagonal affine built from the voxel sizes. That affine says nothing about left and right, so a
silent left-right flip would follow; such files are refused as ``bad_affine``. When
``sform_code`` > 0 the sform is used, else the qform (nibabel's ``get_best_affine`` order).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from rankcore.errors import QuarantineError
from rankcore.mri.header import HeaderInfo, check_affine, check_voxels
from rankcore.mri.types import PreprocessConfig

try:  # ISA-L's inflate is ~2x faster than zlib's (same streams, same checks)
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _inflate = zlib

#: Exceptions nibabel, gzip and numpy raise for files that are not (complete) NIfTI images.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, _inflate.error,
                ValueError)





def _unreadable(path: Path, what: str) -> QuarantineError:
    return QuarantineError("unreadable", f"{path}: {what}")


def _open_bytes(path: Path, raw: bytes):
    """A binary file object over the bytes of ``path`` already in memory (gunzipped lazily)."""
    f = io.BytesIO(raw)
    return gzip.GzipFile(fileobj=f, mode="rb") if path.name.endswith(".gz") else f


def _read_header(path: Path, raw: bytes | None = None) -> nib.Nifti1Header:
    """Parse the header of a single-file NIfTI-1/2 image (reads at most the header bytes).

    ``raw``: the file's bytes, when the caller has read them already (parsed instead).
    """
    if raw is None and not path.exists():
        raise QuarantineError("missing_file", f"{path}: file does not exist")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise _unreadable(path, "not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        opener = nib.openers.ImageOpener(str(path), "rb") if raw is None else _open_bytes(
            path, raw)
        with opener as f:
            block = f.read(nib.Nifti2Header.sizeof_hdr)
            f.seek(0)
            if nib.Nifti2Header.may_contain_header(block):
                header = nib.Nifti2Header.from_fileobj(f)
            elif nib.Nifti1Header.may_contain_header(block):
                header = nib.Nifti1Header.from_fileobj(f)
            else:
                raise _unreadable(path, "not a NIfTI-1/2 file (no NIfTI header found)")
    except QuarantineError:
        raise
    except _READ_ERRORS as e:
        raise _unreadable(path, f"cannot read the header ({type(e).__name__}: {e})") from None
    if header["magic"] not in (b"n+1", b"n+2"):
        raise _unreadable(path, "a NIfTI pair header (.hdr/.img); convert it to a single .nii")
    return header


def _header_affine(header: nib.Nifti1Header, path: Path) -> tuple[np.ndarray, str]:
    if header["sform_code"] > 0:
        return header.get_sform(), "sform"
    if header["qform_code"] > 0:
        try:
            return header.get_qform(), "qform"
        except ValueError as e:  # an invalid quaternion (b, c, d) in the header
            raise QuarantineError("bad_affine", f"{path}: invalid qform ({e})") from None
    raise QuarantineError(
        "bad_affine", f"{path}: sform_code and qform_code are both 0, so the header gives no "
                      "voxel-to-world orientation (left/right would be a guess)")


def inspect_header(path: str | Path, config: PreprocessConfig, *,
                   raw: bytes | None = None) -> HeaderInfo:
    """Read and check a NIfTI header without reading any voxel.

    Checks, in order: the file exists and holds a single-file NIfTI-1/2 header (`unreadable`);
    3-D or 4-D+ with singleton extra dimensions (`wrong_dims`); voxel count at most
    ``config.max_voxels`` (`too_large`); an uncompressed file holds all the voxel bytes its
    header promises (`unreadable`); a valid affine (`bad_affine`).

    Args:
        path: .nii or .nii.gz file.
        config: preprocessing configuration (only ``max_voxels`` is used).
        raw: the whole file's bytes when already read (see :func:`read_source`): the header
            is parsed from them, and the file is not opened again.

    Returns:
        The header's description of the image.

    Raises:
        QuarantineError: with the categories listed above (and `missing_file`).
    """
    path = Path(path)
    header = _read_header(path, raw)
    fmt = "NIfTI-2" if isinstance(header, nib.Nifti2Header) else "NIfTI-1"
    try:
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
    except _READ_ERRORS as e:
        raise _unreadable(path, f"invalid header ({e})") from None
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise _unreadable(path, f"voxel type {dtype} is not a real scalar type")
    if len(shape) < 3 or any(s != 1 for s in shape[3:]) or min(shape[:3]) < 2:
        raise QuarantineError(
            "wrong_dims", f"{path}: shape {shape} is not a 3-D volume (or 4-D with one volume)")
    n_voxels = int(np.prod(shape, dtype=object))
    if n_voxels > config.max_voxels:
        raise QuarantineError(
            "too_large", f"{path}: header promises {'x'.join(map(str, shape))} = {n_voxels:,} "
                         f"voxels ({n_voxels * 4 / 2**30:.1f} GiB as float32), more than "
                         f"max_voxels={config.max_voxels:,}")
    if not path.name.endswith(".gz"):
        need = int(header.get_data_offset()) + n_voxels * dtype.itemsize
        have = path.stat().st_size if raw is None else len(raw)
        if have < need:
            raise _unreadable(path, f"truncated: header promises {need:,} bytes, file has "
                                    f"{have:,}")
    affine, affine_source = _header_affine(header, path)
    affine = check_affine(affine, str(path))
    slope, inter = header.get_slope_inter()
    return HeaderInfo(
        path=path, format=fmt, shape=shape, dtype=str(dtype), affine=affine,
        affine_source=affine_source, orientation="".join(nib.aff2axcodes(affine)),
        spacing=tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
        scl_slope=None if slope is None else float(slope),
        scl_inter=None if inter is None else float(inter),
        data_offset=int(header.get_data_offset()),
    )




def _gunzip(raw: bytes, need: int) -> bytes:
    """The first ``need`` bytes of a gzip stream, checking the whole stream.

    Decompression runs to the end of the last member (what follows ``need`` is discarded a
    megabyte at a time), so that gzip's CRC-32 and length checks see every byte: stopping
    after the voxels, as nibabel does, would accept a corrupted tail. Several members and
    zero padding after the last one are accepted, like Python's ``gzip`` module.

    Inflation uses ISA-L (``isal.isal_zlib``, the same API as ``zlib``) when installed.

    Raises:
        zlib.error (or isal_zlib.error): a corrupt stream or a failed check. EOFError: the
            stream ends early.
    """
    parts: list[bytes] = []
    got = 0
    data = raw
    while True:
        d = _inflate.decompressobj(16 + _inflate.MAX_WBITS)  # gzip wrapper
        while not d.eof:
            if data:
                piece = d.decompress(data, need - got if got < need else 1 << 20)
                data = d.unconsumed_tail
            else:
                piece = d.flush()
                if not d.eof:
                    raise EOFError("truncated gzip stream (it has no end-of-stream marker)")
            if got < need and piece:
                piece = piece[: need - got]
                parts.append(piece)
                got += len(piece)
        data = d.unused_data
        if not data.strip(b"\x00"):
            break
    if got < need:
        raise EOFError(f"truncated: header promises {need:,} bytes, file holds {got:,}")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_bytes(path: Path, need: int, raw: bytes | None = None) -> bytes | memoryview:
    """The first ``need`` bytes of the (decompressed) file: header, extensions and voxels.

    ``raw``: the whole file's bytes when already read (then nothing is read here).
    """
    if path.name.endswith(".gz"):
        return _gunzip(path.read_bytes() if raw is None else raw, need)
    if raw is None:
        with path.open("rb") as f:
            raw = f.read(need)
    if len(raw) < need:
        raise EOFError(f"truncated: header promises {need:,} bytes, file holds {len(raw):,}")
    return raw if len(raw) == need else memoryview(raw)[:need]


def read_source(path: str | Path) -> tuple[bytes, os.stat_result]:
    """All the bytes of a file, and its stat taken from the same open file.

    The ingest reads each source once: the bytes are hashed (the cache's content address)
    and then decoded by :func:`load_volume` (``raw=``), so the digest describes exactly the
    bytes that were preprocessed.

    Raises:
        OSError: FileNotFoundError when the file does not exist, or any read error.
    """
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        return f.readall(), st


#: Voxels scaled per step in float64: a 1 MiB temporary, about one core's L2 cache (on the
#: benchmark VM ~2x faster than 8 MiB steps, ~2x more again than one pass over a whole
#: volume); at least one slab along the last axis.
_SCALE_CHUNK = 2**17


def _scaled(values: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``values * slope + inter`` in float64, rounded once to float32 (inf on overflow)."""
    with np.errstate(over="ignore"):
        return (np.asarray(values, dtype=np.float64) * slope + inter).astype(np.float32)


#: Integers up to this magnitude are exact in float32 (24-bit significand).
_FLOAT32_EXACT_INT = 2**24


def _float32_product_exact(dtype: np.dtype, slope: float, inter: float,
                           extremes: tuple[float, float] | None) -> bool:
    """Whether ``float32(voxel) * float32(slope)`` in float32 equals ``float32(voxel * slope +
    inter)`` computed in float64, for every voxel.

    True when ``inter`` is 0, ``slope`` is a float32 value (NIfTI-1 stores it as one) and
    every voxel is a float32 value (float16/float32 storage, or integers of at most 2**24 in
    magnitude, given by ``extremes``): the product of two 24-bit significands fits float64's
    53 bits, so the float64 product is exact and is rounded once to float32, as a float32
    multiplication rounds the exact product once. Overflow gives inf both ways.
    """
    if inter != 0.0 or float(np.float32(slope)) != slope:
        return False
    if dtype.kind == "f":
        return dtype.itemsize <= 4
    return extremes is not None and max(abs(extremes[0]), abs(extremes[1])) <= _FLOAT32_EXACT_INT


def _scale_into(data: np.ndarray, voxels: np.ndarray, slope: float, inter: float,
                extremes: tuple[float, float] | None = None) -> None:
    """``data[...] = float32(voxels * slope + inter)``, computed in float64 slab by slab.

    One float32 multiplication instead (~5x faster, same bits) when
    :func:`_float32_product_exact` allows it.

    Args:
        data: Fortran-ordered float32 output (n0, n1, n2).
        voxels: Fortran-ordered stored values of the same shape, any real dtype.
        slope: scaling slope; inter: scaling intercept (as float64).
        extremes: (min, max) of integer ``voxels`` when known.
    """
    if _float32_product_exact(voxels.dtype, slope, inter, extremes):
        with np.errstate(over="ignore"):
            np.multiply(voxels, np.float32(slope), out=data, dtype=np.float32,
                        casting="unsafe")
        return
    n0, n1, n2 = data.shape
    step = max(1, _SCALE_CHUNK // max(1, n0 * n1))  # slabs along the slowest (last) axis
    buf = np.empty((n0, n1, min(step, n2)), dtype=np.float64, order="F")
    with np.errstate(over="ignore"):
        for k0 in range(0, n2, step):
            k1 = min(k0 + step, n2)
            tmp = buf[:, :, : k1 - k0]
            np.multiply(voxels[:, :, k0:k1], slope, out=tmp, dtype=np.float64,
                        casting="unsafe")
            if inter != 0.0:
                tmp += inter
            data[:, :, k0:k1] = tmp


def load_volume(path: str | Path, config: PreprocessConfig, *, raw: bytes | None = None,
                ) -> tuple[np.ndarray, np.ndarray, HeaderInfo]:
    """Check the header, then read the voxels as float32 with ``scl_slope``/``scl_inter`` applied.

    The voxels are decoded straight from the file's bytes (``np.frombuffer``, one zlib pass
    for .nii.gz), as ``nibabel``'s ``get_fdata(dtype=np.float32)`` would: ``raw * slope +
    inter`` is computed in float64 and rounded once to float32 (a few slabs at a time, so the
    float64 temporary stays at ~1 MiB), or, when that gives the same bits (intercept 0, a
    float32 slope, voxels exact in float32: see ``_float32_product_exact``), as one float32
    multiplication (~5x faster). The result is Fortran-ordered (NIfTI's voxel order) and
    writeable.

    FreeSurfer .mgz / .mgh files are read through nibabel instead (:mod:`rankcore.mri.mgh`),
    with the same checks.

    Args:
        path: .nii, .nii.gz, .mgz or .mgh file.
        config: preprocessing configuration (``max_voxels``).
        raw: the whole file's bytes when already read (:func:`read_source`); decoded instead
            of reading ``path`` (which then only names the file and its format).

    Returns:
        ``(data, affine, info)``: float32 array of shape ``info.spatial_shape`` (a 4-D image with
        one volume is returned as 3-D), the 4x4 voxel-to-world affine (mm, float64), and the
        header description.

    Raises:
        QuarantineError: any category of :func:`inspect_header`, `unreadable` when the voxel
            data cannot be read (truncated or corrupt stream), `nonfinite`, `empty`.
    """
    if str(path).lower().endswith((".mgz", ".mgh")):
        from rankcore.mri.mgh import load_mgh_volume

        return load_mgh_volume(path, config, raw)
    info = inspect_header(path, config, raw=raw)
    dtype = np.dtype(info.dtype)
    need = info.data_offset + info.n_voxels * dtype.itemsize
    try:
        raw = _read_bytes(info.path, need, raw)
    except _READ_ERRORS as e:
        raise _unreadable(info.path, f"cannot read the voxel data ({type(e).__name__}: "
                                     f"{str(e).strip()})") from None
    voxels = np.frombuffer(raw, dtype=dtype, count=info.n_voxels, offset=info.data_offset)
    voxels = voxels.reshape(info.spatial_shape, order="F")
    slope = 1.0 if info.scl_slope is None else info.scl_slope
    inter = 0.0 if info.scl_inter is None else info.scl_inter
    checked = False
    extremes = None
    if dtype.kind in "biu":
        # integers are finite and scaling (and rounding to float32) is monotonic: the scaled
        # extremes tell whether the volume is finite and constant, from a pass over the stored
        # bytes (half a float32 pass or less) instead of the scaled volume
        extremes = (float(voxels.min()), float(voxels.max()))
        ends = _scaled(np.array(extremes), slope, inter)
        if np.isfinite(ends).all():
            check_voxels(ends, str(info.path))
            checked = True
    data = np.empty(info.spatial_shape, dtype=np.float32, order="F")  # writeable, NIfTI order
    if slope == 1.0 and inter == 0.0:
        data[...] = voxels
    else:
        _scale_into(data, voxels, slope, inter, extremes)
    del raw, voxels
    if not checked:
        check_voxels(data, str(info.path))
    return data, info.affine, info
