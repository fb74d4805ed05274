"""FreeSurfer MGH images (.mgz, .mgh) read through nibabel, with the NIfTI loader's checks.

:func:`rankcore.mri.load.load_volume` hands .mgz / .mgh files here: nibabel parses the
header (big-endian; the vox2ras matrix is the affine), the same `wrong_dims`, `too_large`,
`bad_affine`, `nonfinite` and `empty` checks apply, and the voxels come back as float32 in
voxel order, as for NIfTI.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from rankcore.errors import QuarantineError
from rankcore.mri.header import HeaderInfo, check_affine, check_voxels
from rankcore.mri.types import PreprocessConfig

__all__ = ["MGH_SUFFIXES", "is_mgh", "load_mgh", "load_mgh_volume"]

MGH_SUFFIXES = (".mgz", ".mgh")


def is_mgh(path: str | Path) -> bool:
    """True for a FreeSurfer file name (.mgz or .mgh, any case)."""
    return str(path).lower().endswith(MGH_SUFFIXES)


def _image(path: Path, raw: bytes | None) -> nib.MGHImage:
    try:
        data = raw if raw is not None else path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return nib.MGHImage.from_bytes(data)
    except FileNotFoundError:
        raise QuarantineError("missing_file", f"{path}: does not exist") from None
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise QuarantineError("unreadable", f"{path}: not a readable MGH image "
                                            f"({type(e).__name__}: {e})") from None


def load_mgh(path: str | Path, max_voxels: int, raw: bytes | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read an MGH image: (float32 voxels, 4x4 affine in mm, header facts).

    Args:
        path: a .mgz or .mgh file.
        max_voxels: images with more voxels are `too_large`.
        raw: the file's bytes when already read.

    Returns:
        The voxels (3-D, Fortran order, writeable), the affine, and a dict with ``shape``,
        ``dtype`` and ``data_offset`` (for :class:`rankcore.mri.load.HeaderInfo`).

    Raises:
        QuarantineError: `missing_file`, `unreadable`, `wrong_dims`, `too_large`.
    """
    path = Path(path)
    img = _image(path, raw)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]) or min(shape[:3]) < 2:
        raise QuarantineError("wrong_dims", f"{path}: shape {shape} is not a 3-D volume "
                                            "(or 4-D with one volume)")
    n_voxels = int(np.prod(shape, dtype=object))
    if n_voxels > max_voxels:
        raise QuarantineError("too_large", f"{path}: {n_voxels:,} voxels, more than "
                                           f"max_voxels={max_voxels:,}")
    try:
        data = np.asfortranarray(np.asarray(img.dataobj, dtype=np.float32).reshape(
            shape[:3], order="F"))
    except (OSError, EOFError, ValueError) as e:
        raise QuarantineError("unreadable", f"{path}: cannot read the voxel data "
                                            f"({type(e).__name__}: {e})") from None
    facts = {"shape": shape, "dtype": str(np.dtype(img.get_data_dtype()).newbyteorder("=")),
             "data_offset": int(img.header.get_data_offset())}
    return data, np.asarray(img.affine, dtype=np.float64), facts


def load_mgh_volume(path: str | Path, config: PreprocessConfig, raw: bytes | None = None
                    ) -> tuple[np.ndarray, np.ndarray, HeaderInfo]:
    """:func:`rankcore.mri.load.load_volume` for an MGH file: (voxels, affine, header info).

    Raises:
        QuarantineError: as :func:`load_mgh`, and `bad_affine`, `nonfinite`, `empty`.
    """
    path = Path(path)
    data, affine, facts = load_mgh(path, config.max_voxels, raw)
    affine = check_affine(affine, str(path))
    check_voxels(data, str(path))
    info = HeaderInfo(path=path, format="MGH", shape=facts["shape"], dtype=facts["dtype"],
                      affine=affine, affine_source="vox2ras",
                      orientation="".join(nib.aff2axcodes(affine)),
                      spacing=tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
                      scl_slope=None, scl_inter=None, data_offset=facts["data_offset"])
    return data, affine, info
