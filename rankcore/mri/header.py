"""What every loader checks, whatever the file format: the header record, the affine and the voxels.

Shared by the NIfTI reader (:mod:`rankcore.mri.load`) and the FreeSurfer reader
(:mod:`rankcore.mri.mgh`), so that neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankcore.errors import QuarantineError, ShapeError

__all__ = ["HeaderInfo", "check_affine", "check_voxels"]

#: A voxel-to-world matrix whose condition number exceeds this is treated as singular.
_MAX_CONDITION = 1e6
_BOTTOM_ROW = np.array([0.0, 0.0, 0.0, 1.0])


@dataclass(frozen=True, eq=False)
class HeaderInfo:
    """What a NIfTI header says about an image, read without touching the voxels.

    Attributes:
        path: the file.
        format: "NIfTI-1" or "NIfTI-2".
        shape: the full data shape from the header (3-D, or 4-D+ with singleton extra dims).
        dtype: on-disk voxel type, e.g. "int16".
        affine: 4x4 voxel-to-world matrix in mm (float64), from the sform or the qform.
        affine_source: "sform" or "qform".
        orientation: axis codes of the voxel axes, e.g. "LAS".
        spacing: voxel size along each voxel axis in mm (column norms of the affine).
        scl_slope: header scaling slope (None when unused).
        scl_inter: header scaling intercept (None when unused).
        data_offset: byte offset of the voxel data in the (decompressed) file.
    """

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: str
    affine: np.ndarray
    affine_source: str
    orientation: str
    spacing: tuple[float, float, float]
    scl_slope: float | None
    scl_inter: float | None
    data_offset: int

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """The first three dimensions (the voxel grid)."""
        return (self.shape[0], self.shape[1], self.shape[2])

    @property
    def n_voxels(self) -> int:
        """Number of voxels the header promises (all dimensions)."""
        return int(np.prod(self.shape, dtype=object))


def check_affine(affine: np.ndarray, source: str) -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array, or raise ``QuarantineError("bad_affine")``.

    Args:
        affine: 4x4 voxel-to-world matrix (mm).
        source: file name (or other label) used in the message.

    Raises:
        ShapeError: ``affine`` is not 4x4.
        QuarantineError: non-finite entries, a bottom row other than (0, 0, 0, 1), or a
            singular / near-singular 3x3 part (condition number > 1e6).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ShapeError(f"`affine` must be a 4x4 array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise QuarantineError("bad_affine", f"{source}: affine has non-finite entries: {_fmt(a)}")
    # np.allclose(a[3], (0, 0, 0, 1)) and np.linalg.cond(m), without their overhead
    if not (np.abs(a[3] - _BOTTOM_ROW) <= 1e-8 + 1e-5 * _BOTTOM_ROW).all():
        raise QuarantineError("bad_affine", f"{source}: affine bottom row must be (0, 0, 0, 1), "
                                            f"got {a[3].tolist()}")
    m = a[:3, :3]
    sv = np.linalg.svd(m, compute_uv=False)  # descending; sv[0] / sv[2] is cond(m)
    if np.linalg.norm(m, axis=0).min() <= 0 or not sv[0] <= _MAX_CONDITION * sv[2]:
        raise QuarantineError("bad_affine", f"{source}: affine is singular (a voxel axis has no "
                                            f"length or axes coincide): {_fmt(a)}")
    return a


def _fmt(a: np.ndarray) -> str:
    """A matrix on one line (quarantine messages are one line each)."""
    return str(np.round(a, 4).tolist())


def check_voxels(data: np.ndarray, source: str) -> None:
    """Raise ``QuarantineError`` for non-finite voxels (`nonfinite`) or a constant image (`empty`).

    Args:
        data: voxel array of any shape (float).
        source: file name (or other label) used in the message.
    """
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):  # min/max propagate NaN; inf shows directly
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise QuarantineError("nonfinite", f"{source}: {n_bad:,} voxel(s) are NaN or inf")
    if lo == hi:
        raise QuarantineError("empty", f"{source}: every voxel equals {lo:g} (constant image)")
