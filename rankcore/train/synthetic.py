"""Tiny synthetic cohorts for tests and benchmarks: a bright blob whose size grows with age.

Not a brain simulator (that is rankcore.mri's job): just volumes where age is visible, so a
few epochs of training on CPU learn something measurable.
"""

from __future__ import annotations

import numpy as np
import torch

from rankcore.train.data import SubjectData

__all__ = ["synthetic_subjects"]


def synthetic_subjects(n: int, shape: tuple[int, int, int] = (16, 20, 16), *, seed: int = 0,
                       age_range: tuple[float, float] = (20.0, 80.0), noise: float = 0.3,
                       integer_ages: bool = False) -> SubjectData:
    """``n`` subjects whose image is a blob of radius growing linearly with age, plus noise.

    The blob is an ellipsoid centred near the middle (jittered by up to one voxel) with
    radius ``0.15 + 0.25 · (age − lo) / (hi − lo)`` of each axis' length; voxels inside are
    1, outside 0, plus Gaussian noise of sd ``noise``. Sex is random (+1 / −1) and does not
    affect the image.

    Returns:
        A :class:`SubjectData` with float32 images (n, 1, X, Y, Z), ids ``syn-0000``, ...
    """
    rng = np.random.default_rng(seed)
    lo, hi = age_range
    ages = rng.uniform(lo, hi, n)
    if integer_ages:
        ages = np.round(ages)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape],
                                indexing="ij"))
    sizes = np.asarray(shape, dtype=np.float32)[:, None, None, None]
    images = np.empty((n, *shape), dtype=np.float32)
    for i, age in enumerate(ages):
        centre = (sizes[:, 0, 0, 0] - 1) / 2 + rng.uniform(-1, 1, 3)
        radius = (0.15 + 0.25 * (age - lo) / (hi - lo)) * sizes
        dist = (((grid - centre[:, None, None, None]) / radius) ** 2).sum(0)
        images[i] = (dist <= 1.0) + rng.normal(0, noise, shape)
    sex = rng.choice([-1.0, 1.0], n)
    return SubjectData.from_tensors(torch.from_numpy(images), ages, sex=sex,
                                    participant_ids=[f"syn-{i:04d}" for i in range(n)])
