"""Step 1 of preprocessing: low-pass along the source's axes before downsampling.

Where the target spacing is at least k times the voxel size along an axis (k integer), blocks
of k voxels are averaged along it; a residual non-integer factor r > 1.1 gets a Gaussian of
sigma sqrt((r² - 1) / 12) voxels (the variance a box of width r adds). See
:mod:`rankcore.mri.preprocess`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["_antialias", "_antialias_note", "_block_average", "_smooth"]


def _block_average(data: np.ndarray, affine: np.ndarray, spacing: float,
                   ) -> tuple[np.ndarray, np.ndarray, list[int], list[float]]:
    """Average k-voxel blocks along each axis whose voxels are k or more times finer.

    Returns:
        (data, its affine, block sizes k per axis, residual Gaussian sigmas in voxels of the
        block grid: 0 where the remaining factor is at most 1.1). ``data`` itself comes back
        (not a copy) when no axis is averaged.
    """
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    factors = spacing / voxel
    ks = [max(1, math.floor(f + 1e-6)) for f in factors]
    if max(ks) > 1:
        for axis, k in enumerate(ks):
            if k == 1:
                continue
            n = data.shape[axis] // k
            parts = []
            for j in range(k):
                take = [slice(None)] * 3
                take[axis] = slice(j, n * k, k)
                parts.append(data[tuple(take)])
            acc = np.add(parts[0], parts[1], dtype=np.float32)  # a new array, 1/k the size
            for part in parts[2:]:
                acc += part
            data = acc
        data *= np.float32(1.0 / np.prod(ks))
        # block voxel j covers source voxels k*j .. k*j+k-1: its centre is at k*j + (k-1)/2
        block = np.diag([*ks, 1]).astype(np.float64)
        block[:3, 3] = [(k - 1) / 2 for k in ks]
        affine = affine @ block
    sigmas = [math.sqrt((r * r - 1) / 12) if r > 1.1 else 0.0
              for r in (f / k for f, k in zip(factors, ks))]
    return data, affine, ks, sigmas


def _antialias_note(ks: list[int], sigmas: list[float]) -> str:
    notes = []
    if max(ks) > 1:
        notes.append(f"block average {'x'.join(map(str, ks))}")
    if any(sigmas):
        notes.append("gaussian sigma " + "/".join(f"{s:.2f}" for s in sigmas) + " vox")
    return ", ".join(notes)


def _smooth(data: np.ndarray, sigmas: list[float]) -> np.ndarray:
    """The residual Gaussian of step 1 as a filter (for the point-by-point path)."""
    if not any(sigmas):
        return data
    return ndimage.gaussian_filter(np.asarray(data, dtype=np.float32), sigmas, mode="nearest",
                                   truncate=3.0, output=np.float32)


def _antialias(data: np.ndarray, affine: np.ndarray, spacing: float,
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """Low-pass along the axes that will be downsampled; returns data, its affine, a note."""
    data, affine, ks, sigmas = _block_average(data, affine, spacing)
    return _smooth(data, sigmas), affine, _antialias_note(ks, sigmas)
