"""Per-subject anatomy of the cohort simulator: a smooth, volume-preserving random warp.

Every simulated brain is the template's anatomy unless it is deformed: only rigid pose and
head size would vary, which an affine registration removes entirely. ``sample_warp`` draws a
smooth nonlinear displacement field of a few mm (what an affine registration cannot remove);
``warp_maps`` resamples partial-volume maps through it. Both are deterministic given the
subject's ``warp_seed`` (sample, then apply).

The field is the curl of a random vector potential ``A``: three cubic B-spline fields with
i.i.d. standard normal coefficients on nodes every ``node_mm`` mm, anchored at MNI 0, so that
a seed gives the same field shape at every working spacing. ``u = curl A`` is divergence-free,
so the warp moves and reshapes structures while keeping every region's volume to first order
(Jacobian determinant ``1 + O(|grad u|^2)``). That keeps anatomical variability orthogonal to
age: it is drawn independently of the subject's age, and it does not change the tissue
volumes through which ageing acts (the truth table records the volumes actually rendered).
The field is scaled so that the RMS displacement per axis over the template brain is exactly
``sd_mm``; it is evaluated analytically (separable B-spline bases and their derivatives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from rankcore.errors import InputError
from rankcore.mri.mni import TemplateMaps

#: Spacing (mm) of the B-spline nodes of the vector potential: the warp's smoothness scale.
WARP_NODE_MM = 30.0
#: Largest accepted RMS displacement (mm): well below the size at which the warp folds
#: (Jacobian determinant <= 0 somewhere in the brain).
MAX_WARP_SD_MM = 4.0
# The potential's nodes cover the template brain's box plus this margin (mm), whatever the
# working grid, so that a seed gives the same field at every spacing.
_NODE_MARGIN_MM = 64.0

__all__ = ["MAX_WARP_SD_MM", "WARP_NODE_MM", "Warp", "check_warp_sd", "jacobian_determinant",
           "sample_warp", "warp_maps"]


@dataclass(frozen=True, eq=False)
class Warp:
    """A displacement field on a padded copy of the template's working grid.

    Attributes:
        displacement: (3, X, Y, Z) float32 displacement in template mm; a warped map is
            ``warped(x) = map(x + displacement(x))``.
        affine: 4x4 voxel-to-world affine of the padded grid (RAS, MNI mm).
        pad: voxels added on each side of the template grid (room for the moved brain).
        sd_mm: RMS displacement per axis over the template brain (mm).
        max_mm: largest displacement length over the template brain (mm).
    """

    displacement: np.ndarray
    affine: np.ndarray
    pad: int
    sd_mm: float
    max_mm: float


def check_warp_sd(value: object) -> float:
    """Validate an RMS warp displacement in mm (0 = no warp); return it as a float."""
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not 0.0 <= value <= MAX_WARP_SD_MM):
        raise InputError(f"`warp_sd_mm` must be a number of mm in [0, {MAX_WARP_SD_MM:g}], "
                         f"got {value!r}")
    return float(value)


def _bspline(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline B3(t) and its derivative dB3/dt."""
    a = np.abs(t)
    inner, outer = a < 1.0, (a >= 1.0) & (a < 2.0)
    value = np.where(inner, 2.0 / 3.0 - a**2 + 0.5 * a**3,
                     np.where(outer, (2.0 - a) ** 3 / 6.0, 0.0))
    slope = np.where(inner, -2.0 * t + 1.5 * t * a,
                     np.where(outer, -np.sign(t) * (2.0 - a) ** 2 / 2.0, 0.0))
    return value, slope


def _bases(coords: np.ndarray, node_mm: float, lo: float, hi: float,
           ) -> tuple[np.ndarray, np.ndarray]:
    """(value, d/dx) basis matrices (len(coords), nodes) of nodes every node_mm over [lo, hi].

    Nodes sit at multiples of ``node_mm`` (MNI 0 is a node), so they do not depend on coords.
    """
    nodes = np.arange(math.floor(lo / node_mm) - 2, math.ceil(hi / node_mm) + 3) * node_mm
    value, slope = _bspline((coords[:, None] - nodes[None, :]) / node_mm)
    return value.astype(np.float32), (slope / node_mm).astype(np.float32)


def _tensor(c: np.ndarray, bx: np.ndarray, by: np.ndarray, bz: np.ndarray) -> np.ndarray:
    """sum_abc c[a, b, c] bx[i, a] by[j, b] bz[k, c] (separable evaluation)."""
    t = np.tensordot(bx, c, axes=(1, 0))           # (I, b, c)
    t = np.tensordot(t, by, axes=(1, 1))           # (I, c, J)
    t = np.tensordot(t, bz, axes=(1, 1))           # (I, J, K)
    return t


def sample_warp(template: TemplateMaps, seed: int, sd_mm: float,
                node_mm: float = WARP_NODE_MM) -> Warp:
    """Draw the smooth divergence-free warp of one subject (deterministic given ``seed``).

    Args:
        template: working-grid template maps (``rankcore.mri.mni.template_maps``).
        seed: the subject's warp seed (non-negative integer).
        sd_mm: RMS displacement per axis over the template brain, mm (> 0).
        node_mm: spacing of the potential's B-spline nodes, mm (the smoothness scale).

    Returns:
        Warp on the template grid padded by enough voxels to hold the moved brain.
    """
    sd_mm = check_warp_sd(sd_mm)
    if sd_mm == 0.0:
        raise InputError("`warp_sd_mm` must be > 0 to sample a warp, got 0")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"`seed` must be a non-negative integer, got {seed!r}")
    s = template.spacing
    # Evaluate on a generous padding (6 x the RMS), then keep what the moved brain needs. The
    # truth is measured on the maps as rendered, so even a capped padding stays consistent.
    big = math.ceil(6.0 * sd_mm / s) + 1
    u = _curl_field(template, big, int(seed), node_mm)
    brain = np.pad(template.mask, big) >= 0.5
    inside = u[:, brain].astype(np.float64)
    scale = sd_mm / math.sqrt(float(np.mean(inside**2)))
    u *= np.float32(scale)
    reach = math.sqrt(float(np.einsum("i...,i...->...", u, u).max()))
    pad = min(big, math.ceil(reach / s) + 1)
    cut = big - pad
    core = (slice(None), *tuple(slice(cut, u.shape[1 + a] - cut) for a in range(3)))
    u = np.ascontiguousarray(u[core])
    affine = template.affine.copy()
    affine[:3, 3] -= pad * s
    max_mm = scale * math.sqrt(float((inside**2).sum(axis=0).max()))
    return Warp(displacement=u, affine=affine, pad=pad, sd_mm=sd_mm, max_mm=max_mm)


def _curl_field(template: TemplateMaps, pad: int, seed: int, node_mm: float) -> np.ndarray:
    """curl A (unscaled, float32) on the template grid padded by ``pad`` voxels."""
    s, shape = template.spacing, template.shape
    lo, hi = template.brain_corners.min(axis=0), template.brain_corners.max(axis=0)
    vals, ders = [], []
    for ax in range(3):
        coords = template.affine[ax, 3] + s * np.arange(-pad, shape[ax] + pad, dtype=np.float64)
        if coords[0] < lo[ax] - _NODE_MARGIN_MM or coords[-1] > hi[ax] + _NODE_MARGIN_MM:
            raise InputError(f"`pad` must keep the grid within {_NODE_MARGIN_MM:g} mm of the "
                             f"brain, got {pad} voxels of {s:g} mm")
        v, d = _bases(coords, node_mm, lo[ax] - _NODE_MARGIN_MM, hi[ax] + _NODE_MARGIN_MM)
        vals.append(v)
        ders.append(d)
    rng = np.random.default_rng(seed)
    pot = rng.standard_normal((3, *tuple(v.shape[1] for v in vals))).astype(np.float32)

    def deriv(comp: int, axis: int) -> np.ndarray:
        b = [ders[a] if a == axis else vals[a] for a in range(3)]
        return _tensor(pot[comp], *b)

    return np.stack([deriv(2, 1) - deriv(1, 2),
                     deriv(0, 2) - deriv(2, 0),
                     deriv(1, 0) - deriv(0, 1)])


def jacobian_determinant(warp: Warp) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` on the warp's grid (central differences).

    Values > 0 mean the warp does not fold; divergence-free warps stay close to 1.
    """
    s = float(warp.affine[0, 0])
    g = [[d.astype(np.float64) + (1.0 if i == j else 0.0)
          for j, d in enumerate(np.gradient(warp.displacement[i], s))] for i in range(3)]
    return (g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
            - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
            + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0]))


def warp_maps(warp: Warp, support: np.ndarray, *maps: np.ndarray) -> list[np.ndarray]:
    """Resample template-grid maps through ``warp`` (trilinear); return them on its padded grid.

    Args:
        warp: from ``sample_warp`` on the same template grid.
        support: (X, Y, Z) non-negative map on the template's working grid (the brain mask).
        *maps: more maps of that shape, each zero wherever ``support`` is zero (tissue maps).
            They are only interpolated where the warped support is non-zero.

    Returns:
        float32 arrays ``[support, *maps]`` warped, of shape ``warp.displacement.shape[1:]``.
    """
    shape = warp.displacement.shape[1:]
    inner = tuple(n - 2 * warp.pad for n in shape)
    for m in (support, *maps):
        if m.shape != inner:
            raise InputError(f"`maps` must have the template grid's shape {inner}, "
                             f"got {m.shape}")
    s = np.float32(warp.affine[0, 0])
    idx = np.indices(shape, dtype=np.float32)
    idx += warp.displacement / s
    idx -= np.float32(warp.pad)  # padded-grid index -> template-grid index
    kw = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    first = ndi.map_coordinates(support, idx, **kw).astype(np.float32, copy=False)
    band = first > 0
    points = idx[:, band]
    out = [first]
    for m in maps:
        full = np.zeros(shape, dtype=np.float32)
        full[band] = ndi.map_coordinates(m, points, **kw)
        out.append(full)
    return out
