"""The ageing model of the cohort simulator: tissue maps of a brain of a given brain age.

Annual rates (% per year, piecewise linear in age between the knots below, as in FIELD.md
"Simulating a cohort from a real template") are integrated from the template's age
(``TEMPLATE_AGE`` = 25 y) to the subject's brain age ``b``:

- grey matter (GM) loss: 0 below 25, 0.2 %/y at 35, 0.5 %/y at 60, 0.8 %/y at 80; the lost
  GM becomes CSF, frontal faster;
- white matter (WM) change: an inverted U, growing until 30, flat 30-50, then -0.5 %/y at 70
  and -1 %/y at 80; lost WM becomes CSF;
- where tissue is lost: at its border with CSF (cortical thinning from the pial side, sulcal
  and periventricular widening), not evenly inside every voxel. A voxel loses the share
  ``min(1, lam * weight * border)`` of its GM (or WM), where ``border`` is the template's CSF
  content smoothed over ``BORDER_SIGMA_MM`` and ``lam`` is solved so that the volume matches.
  Voxels far from CSF (deep white matter, the inside of thick grey matter) keep their pure
  tissue at every age, as in real brains, so the loss is visible as more CSF, not as darker
  tissue;
- lateral ventricles: +1.5 %/y of volume before 50, 3 %/y at 70, 5 %/y at 80, times a
  per-subject multiplier. The ventricles grow (or shrink) by moving their wall outward along
  its normal by ``r`` mm (a smooth dilation of the signed distance map), ``r`` solved so that
  the volume matches; the tissue they displace is removed in proportion to what was there.

Volumes compound: factor(b) = exp(± integral of rate / 100 from 25 to b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from rankcore.errors import InputError
from rankcore.mri.mni import TEMPLATE_AGE, VENTRICLE_ROI_MARGIN_MM, TemplateMaps

#: (age in years, GM loss in % of volume per year); constant outside the knots.
GM_LOSS_KNOTS = ((25.0, 0.0), (35.0, 0.2), (60.0, 0.5), (80.0, 0.8), (100.0, 1.1))
#: (age, WM change in %/y): + growth before 30, flat 30-50, loss after.
WM_CHANGE_KNOTS = ((20.0, 0.6), (30.0, 0.0), (50.0, 0.0), (70.0, -0.5), (80.0, -1.0),
                   (100.0, -2.0))
#: Gaussian SD (mm) of the CSF content that says how close a voxel is to CSF (where tissue is lost).
BORDER_SIGMA_MM = 1.5
#: (age, lateral-ventricle growth in %/y).
VENTRICLE_GROWTH_KNOTS = ((50.0, 1.5), (70.0, 3.0), (80.0, 5.0), (100.0, 9.0))

_T = np.arange(0.0, 120.0 + 1e-9, 0.05)


def _cumulative(knots: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Integral of the piecewise-linear rate (in fractions per year) from 0 to each of _T."""
    ages, rates = np.array(knots).T
    r = np.interp(_T, ages, rates) / 100.0
    steps = 0.5 * (r[1:] + r[:-1]) * np.diff(_T)
    return np.concatenate([[0.0], np.cumsum(steps)])


_CUM = {name: _cumulative(k) for name, k in
        (("gm", GM_LOSS_KNOTS), ("wm", WM_CHANGE_KNOTS), ("vent", VENTRICLE_GROWTH_KNOTS))}


def _integral(name: str, brain_age: float | np.ndarray) -> np.ndarray:
    b = np.asarray(brain_age, dtype=np.float64)
    if not np.all(np.isfinite(b)) or np.any(b < 0) or np.any(b > 120):
        raise InputError(f"`brain_age` must be between 0 and 120 years, got {brain_age!r}")
    cum = _CUM[name]
    return np.interp(b, _T, cum) - np.interp(TEMPLATE_AGE, _T, cum)


def gm_retained(brain_age: float | np.ndarray) -> np.ndarray:
    """Fraction of the template's GM volume left at ``brain_age`` (1 at or below 25 y)."""
    return np.exp(-_integral("gm", brain_age))


def wm_factor(brain_age: float | np.ndarray) -> np.ndarray:
    """WM volume relative to the template (slightly > 1 around 30-50 y, < 1 when older)."""
    return np.exp(_integral("wm", brain_age))


def ventricle_factor(brain_age: float | np.ndarray) -> np.ndarray:
    """Lateral-ventricle volume relative to the template (before the subject multiplier)."""
    return np.exp(_integral("vent", brain_age))


@dataclass(frozen=True, eq=False)
class AgedTissue:
    """Partial-volume maps of one aged brain on the template's working grid (float32).

    ``gm + wm + csf == template.mask``; ``ventricles`` (part of ``csf``) is the lateral
    ventricles' partial volume. Volumes are in ml in template (MNI) space. A subject whose
    anatomy was warped (``rankcore.mri.phantom.subject_anatomy``) holds its warped maps (on
    the warp's padded grid, summing to the warped mask) and their volumes, with the warp's
    RMS (``warp_sd_mm``) and largest (``warp_max_mm``) displacement; both are 0 otherwise.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    gm_ml: float
    wm_ml: float
    csf_ml: float
    ventricle_ml: float
    ventricle_shift_mm: float
    warp_sd_mm: float = 0.0
    warp_max_mm: float = 0.0


def _wall_ramp(distance: np.ndarray, shift_mm: float, spacing: float) -> np.ndarray:
    """Partial volume of a region whose wall sits at ``distance == shift_mm`` (ramp 1 voxel)."""
    return np.clip(0.5 + (shift_mm - distance) / spacing, 0.0, 1.0, dtype=np.float32)


def _solve_shift(distance: np.ndarray, room: np.ndarray, spacing: float, target_vox: float,
                 ) -> float:
    """Outward wall shift (mm) whose ventricle volume (voxels, capped by ``room``) is the target."""
    lo, hi = -float(np.abs(distance.min())) - spacing, VENTRICLE_ROI_MARGIN_MM - 2 * spacing
    vol = lambda r: float(np.minimum(_wall_ramp(distance, r, spacing), room).sum())  # noqa: E731
    if vol(hi) <= target_vox:
        return hi
    for _ in range(40):  # bisection: the volume is continuous and non-decreasing in the shift
        mid = 0.5 * (lo + hi)
        if vol(mid) < target_vox:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3:
            break
    return 0.5 * (lo + hi)


def _csf_border(template: TemplateMaps) -> np.ndarray:
    """Template CSF content smoothed over ``BORDER_SIGMA_MM`` (high next to CSF, ~0 deep)."""
    sigma = BORDER_SIGMA_MM / template.spacing
    return ndi.gaussian_filter(template.csf, sigma, truncate=3.0).astype(np.float32)


def _lose_at_border(tissue: np.ndarray, weight: np.ndarray, lost: float) -> np.ndarray:
    """``tissue * (1 - min(1, lam * weight))`` with ``lam`` solved so that ``lost`` of the
    tissue's total volume (a fraction in [0, 1)) is removed; ``weight >= 0``."""
    if lost <= 0.0:
        return tissue.copy()
    keep = tissue > 0
    t, w = tissue[keep].astype(np.float64), weight[keep].astype(np.float64)
    target = lost * float(t.sum())
    removed = lambda lam: float((t * np.minimum(1.0, lam * w)).sum())  # noqa: E731
    lo, hi = 0.0, 1.0
    while removed(hi) < target and hi < 1e12:  # non-decreasing in lam; bracket it
        lo, hi = hi, hi * 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if removed(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    out = tissue.copy()
    out[keep] = (t * (1.0 - np.minimum(1.0, hi * w))).astype(np.float32)
    return out


def age_tissue(template: TemplateMaps, brain_age: float, ventricle_multiplier: float = 1.0,
               ) -> AgedTissue:
    """Tissue maps of a brain whose brain age is ``brain_age`` (years).

    Args:
        template: working-grid template maps (``rankcore.mri.mni.template_maps``).
        brain_age: biological age of the brain in years (0-120).
        ventricle_multiplier: subject factor on the lateral-ventricle volume (> 0).

    Returns:
        AgedTissue on ``template.shape``.
    """
    if not (np.isfinite(ventricle_multiplier) and ventricle_multiplier > 0):
        raise InputError("`ventricle_multiplier` must be a positive number, got "
                         f"{ventricle_multiplier!r}")
    s, roi = template.spacing, template.ventricle_roi
    mask, gm, wm, csf = template.mask, template.gm, template.wm, template.csf

    # Template ventricles on the ROI (never more than the CSF already there).
    m_roi = mask[roi]
    v_tpl = np.minimum(_wall_ramp(template.ventricle_distance, 0.0, s),
                       np.minimum(csf[roi], template.ventricle_room))

    # GM loss (frontal faster) and WM change, at the tissue's border with CSF.
    border = _csf_border(template)
    gm1 = _lose_at_border(gm, template.gm_loss_weight * border,
                          1.0 - float(gm_retained(brain_age)))
    room = mask.copy()
    room[roi] -= v_tpl
    factor = float(wm_factor(brain_age))
    wm1 = (wm * np.float32(factor) if factor >= 1.0
           else _lose_at_border(wm, border, 1.0 - factor))
    wm1 = np.maximum(np.minimum(wm1, room - gm1), 0.0)

    # Ventricles: grow the wall until the volume matches the target.
    target = float(v_tpl.sum()) * float(ventricle_factor(brain_age)) * ventricle_multiplier
    shift = _solve_shift(template.ventricle_distance, template.ventricle_room, s, target)
    v_new = np.minimum(_wall_ramp(template.ventricle_distance, shift, s), template.ventricle_room)

    # Inside the ROI the non-ventricular content (gm1, wm1, rest) is rescaled to fill
    # mask - v_new; inside the template's ventricles (no content to rescale) it becomes WM,
    # the tissue that surrounds them.
    room_roi = room[roi]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(m_roi > 0, room_roi / m_roi, 1.0)
        safe = np.maximum(room_roi, 1e-6)
        p_gm = gm1[roi] / safe
        p_wm = wm1[roi] / safe
    blend = np.clip(frac / 0.25, 0.0, 1.0)
    p_gm = blend * p_gm
    p_wm = blend * p_wm + (1.0 - blend)
    left = m_roi - v_new
    gm2, wm2 = gm1, wm1
    gm2[roi] = left * p_gm
    wm2[roi] = left * p_wm
    csf2 = np.maximum(mask - gm2 - wm2, 0.0)
    ventricles = np.zeros_like(mask)
    ventricles[roi] = v_new
    ml = template.voxel_ml
    return AgedTissue(gm=gm2, wm=wm2, csf=csf2, ventricles=ventricles,
                      gm_ml=float(gm2.sum()) * ml, wm_ml=float(wm2.sum()) * ml,
                      csf_ml=float(csf2.sum()) * ml, ventricle_ml=float(v_new.sum()) * ml,
                      ventricle_shift_mm=shift)
