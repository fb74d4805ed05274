"""Bias-field correction with SimpleITK's N4 (Tustison et al. 2010), on a shrunk copy.

N4 fits a smooth multiplicative field (a B-spline of the log intensities) that sharpens the
intensity histogram inside a mask. It is fitted on a copy shrunk to about ``shrink_mm``
(a field that smooth needs no finer grid), then evaluated on the full grid.

SimpleITK images are built from (x, y, z) RAS arrays with identity direction, origin and
spacing from the grid's affine: every image of one subject shares that frame, so transforms
estimated here are maps between RAS world coordinates in mm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk

from rankcore.errors import InputError

__all__ = ["correct_bias", "from_image", "single_thread", "to_image"]


@contextlib.contextmanager
def single_thread(threads: int = 1) -> Iterator[None]:
    """Run SimpleITK filters with ``threads`` threads (an ingest worker owns one core)."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def to_image(arr: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of an (x, y, z) array on an axis-aligned RAS grid.

    Args:
        arr: (x, y, z) array (float32, or uint8 for masks).
        affine: 4x4 voxel-to-world affine, diagonal 3x3 part with positive entries (mm).
    """
    diag = np.diag(affine[:3, :3])
    if not (np.allclose(affine[:3, :3], np.diag(diag)) and np.all(diag > 0)):
        raise InputError(f"`affine` must be axis-aligned RAS with positive spacing, got "
                         f"{np.round(affine, 4).tolist()}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(v) for v in diag))
    img.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    return img


def from_image(img: sitk.Image) -> np.ndarray:
    """The (x, y, z) array of a SimpleITK image (a copy)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def correct_bias(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, *,
                 shrink_mm: float = 4.0, iterations: tuple[int, ...] = (40, 30),
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Divide ``image`` by the N4 bias field fitted inside ``mask``.

    Args:
        image: positive intensities (x, y, z), float32, in the scanner's units.
        mask: boolean (x, y, z): where the field is fitted and the output is defined.
        affine: 4x4 voxel-to-world affine of the grid (axis-aligned, mm).
        shrink_mm: voxel size (mm) of the copy the field is fitted on.
        iterations: N4 iterations per fitting level (one level per entry).

    Returns:
        (corrected float32 (x, y, z), 0 outside ``mask``; log bias field float32 (x, y, z)).
    """
    spacing = float(np.abs(affine[0, 0]))
    shrink = max(1, round(shrink_mm / spacing))
    img = to_image(np.asarray(image, dtype=np.float32), affine)
    msk = to_image(mask.astype(np.uint8), affine)
    small = sitk.Shrink(img, [shrink] * 3) if shrink > 1 else img
    small_mask = sitk.Shrink(msk, [shrink] * 3) if shrink > 1 else msk
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    log_bias = from_image(n4.GetLogBiasFieldAsImage(img)).astype(np.float32)
    corrected = np.where(mask, image * np.exp(-log_bias), np.float32(0.0)).astype(np.float32)
    return corrected, log_bias
