"""Affine alignment of a subject to the MNI ICBM152 2009 template (SimpleITK).

The template (moving) is aligned to the subject (fixed), so that the result maps subject
world coordinates (mm) to template (MNI) coordinates and the template's maps can be pulled
onto the subject's own grid. Steps, both on ~``spacing_mm`` grids (block averages of the
subject; the template's maps at that spacing):

1. centres of mass of the two images matched (``CenteredTransformInitializer``, MOMENTS);
2. rigid (Euler3D) then affine (12 parameters) registration, Mattes mutual information
   (32 bins, a fixed-seed random sample of the voxels, so the result is deterministic),
   regular-step gradient descent with scales from physical shifts.

Mutual information only asks that the intensities of the two images predict each other,
so the template's own contrast need not match the subject's: a T1-like image is built from
its tissue maps (WM 1, GM 0.7, CSF 0.25, background 0).
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from rankcore.mri.mni import TemplateMaps, template_maps
from rankcore.mri.n4 import to_image

__all__ = ["affine_to_matrix", "pull_template", "register_to_template", "template_t1"]

#: Contrast (WM = 1) of the T1-like template image built from its tissue maps.
_TEMPLATE_CONTRAST = {"gm": 0.7, "csf": 0.25}


@functools.lru_cache(maxsize=4)
def template_t1(spacing: float) -> tuple[sitk.Image, TemplateMaps]:
    """The T1-like template image at ``spacing`` mm and the maps it was built from."""
    maps = template_maps(spacing)
    t1 = maps.wm + _TEMPLATE_CONTRAST["gm"] * maps.gm + _TEMPLATE_CONTRAST["csf"] * maps.csf
    return to_image(t1.astype(np.float32), maps.affine), maps


def affine_to_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a SimpleITK matrix-offset transform (Euler3D, Affine, composite of one)."""
    if isinstance(tx, sitk.CompositeTransform) or tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx).GetNthTransform(0)
        tx = sitk.AffineTransform(tx) if tx.GetName() == "AffineTransform" else tx
    a = np.array(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.array(tx.GetCenter(), dtype=np.float64)
    t = np.array(tx.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def _method(iterations: int, step_mm: float, seed: int) -> sitk.ImageRegistrationMethod:
    """Mattes MI + gradient descent whose step moves no voxel more than ``step_mm``."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    # The learning rate is re-estimated at each iteration so that a step shifts no voxel by
    # more than step_mm: a fixed rate sized for the translations throws the matrix entries
    # of the affine stage far off in its first step.
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=int(iterations), convergenceMinimumValue=1e-5,
        convergenceWindowSize=6, estimateLearningRate=reg.EachIteration,
        maximumStepSizeInPhysicalUnits=float(step_mm))
    reg.SetOptimizerScalesFromPhysicalShift()
    return reg


def _coarse(img: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``img`` on a ~``spacing_mm`` grid: block averages when the ratio is an integer (2 mm ->
    4 mm), else Gaussian-smoothed linear resampling (3 mm -> 4 mm)."""
    spacing = img.GetSpacing()[0]
    ratio = spacing_mm / spacing
    k = round(ratio)
    if abs(ratio - k) < 0.05:
        return sitk.BinShrink(img, [k] * 3) if k > 1 else img
    if ratio < 1:
        return img
    size = [max(1, int(np.ceil(n * spacing / spacing_mm))) for n in img.GetSize()]
    smooth = sitk.SmoothingRecursiveGaussian(img, 0.5 * np.sqrt(spacing_mm**2 - spacing**2))
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         (spacing_mm,) * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


def register_to_template(image: np.ndarray, affine: np.ndarray, *, spacing_mm: float = 4.0,
                         iterations: tuple[int, int] = (40, 60), seed: int = 1,
                         ) -> np.ndarray:
    """Affine map from subject world (mm) to MNI template world (mm).

    Args:
        image: bias-corrected intensities (x, y, z), 0 outside the brain.
        affine: 4x4 voxel-to-world affine of ``image`` (axis-aligned, mm).
        spacing_mm: voxel size of the grids the registration runs on.
        iterations: most optimiser iterations of the rigid and of the affine stage.
        seed: seed of the metric's voxel sample (fixed: the same input, the same result).

    Returns:
        4x4 float64 matrix M with ``template_xyz = M @ subject_xyz`` (homogeneous, mm).
    """
    fixed = _coarse(to_image(np.asarray(image, dtype=np.float32), affine), spacing_mm)
    moving, _ = template_t1(float(spacing_mm))
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _method(iterations[0], 2.0, seed)
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fixed, moving)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(init.GetCenter())
    aff.SetMatrix(init.GetMatrix())
    aff.SetTranslation(init.GetTranslation())
    reg = _method(iterations[1], 1.0, seed)
    reg.SetInitialTransform(aff, inPlace=True)
    reg.Execute(fixed, moving)
    return affine_to_matrix(aff)


def pull_template(arrays: list[np.ndarray], src_affine: np.ndarray, matrix: np.ndarray,
                  dst_affine: np.ndarray, shape: tuple[int, int, int], *,
                  order: int = 1) -> list[np.ndarray]:
    """Resample template-space arrays onto a subject grid through ``matrix``.

    Args:
        arrays: (a, b, c) arrays on the template grid ``src_affine``.
        src_affine: 4x4 voxel-to-MNI affine of ``arrays``.
        matrix: 4x4 subject world -> template world (from :func:`register_to_template`).
        dst_affine: 4x4 voxel-to-world affine of the subject grid.
        shape: the subject grid (x, y, z).
        order: 1 trilinear (maps), 0 nearest (labels).

    Returns:
        One float32 (or label dtype for ``order`` 0) array of ``shape`` per input; 0 outside
        the template grid.
    """
    m = np.linalg.solve(src_affine, matrix @ dst_affine)  # subject voxel -> template voxel
    return [ndimage.affine_transform(a, m, output_shape=shape, order=order, mode="constant",
                                     cval=0, prefilter=False) for a in arrays]
