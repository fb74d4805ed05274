"""Template regions: nine parts of the MNI ICBM152 2009 brain, defined from its maps in code.

Each template voxel inside the brain (mask >= 0.5) gets the first region, in the order of
``REGIONS``, whose rule it satisfies (x, y, z are MNI coordinates in mm: right, anterior,
superior):

=================  ==========================================================================
ventricles         inside the lateral ventricles (their signed distance < 0)
periventricular    within 8 mm of the ventricles' wall
deep               |x| < 30, -35 < y < 20, -12 < z < 18 (basal ganglia, thalamus, capsules)
brainstem          |x| < 16, -45 < y < -10, z <= -12
cerebellum         y < -40, z < -18
temporal           |x| > 30, z < 0
frontal            y > 0
posterior          y < -40 (parietal and occipital lobes)
central            every other brain voxel (central and superior parietal regions, insula)
=================  ==========================================================================

The labels are deterministic (no random or data-dependent step) and cached per spacing.
"""

from __future__ import annotations

import functools

import numpy as np

from rankcore.mri.mni import TemplateMaps, template_maps
from rankcore.mri.tissue_names import REGIONS

__all__ = ["PERIVENTRICULAR_MM", "REGIONS", "region_labels"]

#: Width (mm) of the periventricular band around the lateral ventricles.
PERIVENTRICULAR_MM = 8.0


def _coordinates(maps: TemplateMaps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = maps.affine
    return tuple(  # type: ignore[return-value]
        (a[ax, ax] * np.arange(maps.shape[ax]) + a[ax, 3]).reshape(
            [-1 if k == ax else 1 for k in range(3)]) for ax in range(3))


def _rules(maps: TemplateMaps) -> list[np.ndarray]:
    x, y, z = _coordinates(maps)
    shape = maps.shape
    dist = np.full(shape, np.inf, dtype=np.float32)
    dist[maps.ventricle_roi] = maps.ventricle_distance
    ax = np.abs(x)

    def full(rule: np.ndarray) -> np.ndarray:
        return np.broadcast_to(rule, shape)

    return [
        dist < 0,
        dist < PERIVENTRICULAR_MM,
        full((ax < 30) & (y > -35) & (y < 20) & (z > -12) & (z < 18)),
        full((ax < 16) & (y > -45) & (y < -10) & (z <= -12)),
        full((y < -40) & (z < -18)),
        full((ax > 30) & (z < 0)),
        full(y > 0),
        full(y < -40),
        np.ones(shape, dtype=bool),
    ]


@functools.lru_cache(maxsize=4)
def region_labels(spacing: float) -> tuple[np.ndarray, TemplateMaps]:
    """Region labels on the template grid of ``spacing`` mm and the maps they come from.

    Returns:
        (uint8 array of the template grid's shape, 0 outside the brain and i + 1 for
        ``REGIONS[i]``, read-only; the :class:`~rankcore.mri.mni.TemplateMaps`).
    """
    maps = template_maps(spacing)
    labels = np.zeros(maps.shape, dtype=np.uint8)
    free = maps.mask >= 0.5
    for i, rule in enumerate(_rules(maps)):
        take = free & rule
        labels[take] = i + 1
        free &= ~take
    labels.setflags(write=False)
    return labels, maps
