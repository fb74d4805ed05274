"""A whole head (not skull-stripped) around a simulated skull-stripped brain, for tests.

The simulator writes skull-stripped brains; :func:`add_head` wraps one in the layers a
whole-head T1 shows outside the brain, from the brain's smoothed outer surface outwards:

1. a dark layer of CSF and meninges (``csf_mm``, intensity ``csf`` of WM);
2. the skull (``skull_mm``): dark cortical bone (``bone`` of WM) with, when ``marrow`` > 0,
   a middle third of fatty diploe at ``marrow`` of WM (bright in older adults' T1);
3. the scalp (``scalp_mm``) at ``scalp`` of WM (subcutaneous fat is T1's brightest tissue);
4. with ``neck``, an elliptic column of muscle (``neck`` of WM) from below the brain to the
   bottom of the field of view, so that the head leaves the field of view as a real scan's
   neck does;
5. outside: Rician noise of SD ``gain / snr`` (``background="noise"``) or exact zeros
   (``"zero"``, as when a converter or a defacing tool masked the air).

The brain's own voxels are kept as they are. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from rankcore._validate import check_choice

__all__ = ["HeadLayers", "add_head"]


@dataclass(frozen=True)
class HeadLayers:
    """Thicknesses (mm) and T1 intensities (fraction of the brain's WM) of the layers."""

    csf_mm: float = 2.0
    skull_mm: float = 6.0
    scalp_mm: float = 6.0
    csf: float = 0.2
    bone: float = 0.08
    marrow: float = 0.0
    scalp: float = 1.1
    neck: float | None = 0.55
    snr: float = 25.0
    background: Literal["noise", "zero"] = "noise"
    pad_mm: float = 24.0


def add_head(image: np.ndarray, affine: np.ndarray, layers: HeadLayers = HeadLayers(), *,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A whole-head version of a skull-stripped ``image`` (see the module docstring).

    Args:
        image: (X, Y, Z) skull-stripped T1 on an axis-aligned grid whose axes run R, A, S
            (0 outside the brain).
        affine: its 4x4 voxel-to-world affine (mm).
        layers: the layers' thicknesses and intensities.
        seed: seed of the background noise.

    Returns:
        (head float32 (X + 2p, Y + 2p, Z + 2p), its affine): the grid padded by
        ``layers.pad_mm`` on every side.
    """
    check_choice(layers.background, "background", ("noise", "zero"))
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    pad = [int(np.ceil(layers.pad_mm / v)) for v in voxel]
    data = np.pad(np.asarray(image, dtype=np.float32), [(p, p) for p in pad])
    out_affine = affine.copy()
    out_affine[:3, 3] -= affine[:3, :3] @ np.array(pad, dtype=np.float64)
    brain = data > 0
    wm = float(np.percentile(data[brain], 90))
    # the outer surface: the brain smoothed over ~4 mm, so the layers do not follow sulci
    hull = ndi.gaussian_filter(brain.astype(np.float32), 4.0 / voxel) > 0.3
    hull = ndi.binary_fill_holes(hull | brain)
    depth = ndi.distance_transform_edt(~hull, sampling=voxel)  # mm outside the hull
    t1, t2 = layers.csf_mm, layers.csf_mm + layers.skull_mm
    t3 = t2 + layers.scalp_mm
    head = np.zeros_like(data)
    head[(depth > 0) & (depth <= t1)] = layers.csf
    skull = (depth > t1) & (depth <= t2)
    head[skull] = layers.bone
    if layers.marrow > 0:
        third = layers.skull_mm / 3
        head[(depth > t1 + third) & (depth <= t2 - third)] = layers.marrow
    head[(depth > t2) & (depth <= t3)] = layers.scalp
    if layers.neck is not None:
        head = _add_neck(head, brain, depth, voxel, t2, t3, layers)
    head *= np.float32(wm)
    head = ndi.gaussian_filter(head, 0.6)  # a point-spread: no hard-edged layers
    head[brain] = data[brain]
    outside = ~brain
    sigma = np.float32(wm / layers.snr)
    rng = np.random.default_rng(seed)
    n = int(outside.sum())
    real = head[outside] + sigma * rng.standard_normal(n, dtype=np.float32)
    imag = sigma * rng.standard_normal(n, dtype=np.float32)
    noisy = np.sqrt(real * real + imag * imag)
    if layers.background == "zero":
        noisy[depth[outside] > t3 + 1.0] = 0.0
        if layers.neck is not None:
            noisy[(head[outside] <= 0.02 * wm) & (depth[outside] > t3 + 1.0)] = 0.0
    head[outside] = noisy
    return head, out_affine


def _add_neck(head: np.ndarray, brain: np.ndarray, depth: np.ndarray, voxel: np.ndarray,
              t2: float, t3: float, layers: HeadLayers) -> np.ndarray:
    """Muscle in an elliptic column under the brain's centre, down to the grid's bottom."""
    idx = np.argwhere(brain)
    centre = idx.mean(axis=0)
    extent = (idx.max(axis=0) - idx.min(axis=0)) * voxel  # mm
    x, y, z = np.ogrid[: head.shape[0], : head.shape[1], : head.shape[2]]
    rx, ry = 0.3 * extent[0], 0.35 * extent[1]
    column = ((((x - centre[0]) * voxel[0] / rx) ** 2
               + ((y - centre[1] + 0.1 * extent[1] / voxel[1]) * voxel[1] / ry) ** 2 <= 1.0)
              & (z < centre[2]))
    neck = column & (depth > t2)
    head[neck & (head == 0)] = layers.neck
    # the skin and fat around the neck
    ring = ndi.binary_dilation(neck, iterations=max(1, round(layers.scalp_mm / 2 / voxel[0])))
    head[ring & (head == 0) & (depth > t3)] = layers.scalp
    return head
