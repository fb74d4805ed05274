"""Tissue probabilities (GM, WM, CSF) and tissue features of one preprocessed T1 volume.

Runs on the output grid of :mod:`rankcore.mri.preprocess` (RAS, ``config.spacing``), inside
its brain mask, in four steps:

1. bias field: SimpleITK's N4 on a copy shrunk to ~``config.bias_shrink_mm``
   (:mod:`rankcore.mri.n4`);
2. affine alignment of the MNI ICBM152 2009 template to the subject
   (:mod:`rankcore.mri.register`), then the template's GM/WM/CSF maps and region labels
   (:mod:`rankcore.mri.regions`) pulled onto the subject's grid;
3. per-voxel GM/WM/CSF fractions from a partial-volume mixture fitted by EM
   (:func:`fit_em`: pure classes plus CSF/GM, GM/WM and CSF/WM mixed classes) whose per-voxel
   class weights are the pulled template maps, mixed with a uniform floor
   (``config.tissue_prior_floor``) and rescaled per class by a weight the EM also fits (the
   mixing proportions of SPM's unified segmentation, Ashburner & Friston 2005): a subject
   with more CSF than the template is not held to the template's proportions, and a
   misaligned prior cannot force a class on a voxel that clearly belongs to another;
4. features (:data:`TISSUE_FEATURES`): global fractions (of the brain mask) and volumes (ml),
   the pure classes' means and noise relative to the WM mean, per-region tissue fractions and
   mean intensity (relative to the WM mean), and the affine map.

A scan whose classification cannot be trusted raises ``QuarantineError("tissue_failed")``
(:func:`check_tissue`): registration overlap or scale implausible, class means not ordered
CSF < GM < WM (not a T1 contrast), too little contrast, CSF not dark (no CSF in the mask),
or implausible tissue fractions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rankcore.errors import QuarantineError
from rankcore.mri.regions import region_labels
from rankcore.mri.tissue_names import CLASSES, REGIONS, TISSUE_FEATURES

__all__ = ["CLASSES", "TISSUE_FEATURES", "TissueResult", "check_tissue", "fit_em",
           "measure_tissue"]


#: Quarantine thresholds (see :func:`check_tissue`).
MIN_DICE = 0.85
SCALE_RANGE = (0.7, 1.4)
MIN_CONTRAST = 1.0
MAX_CSF_MEAN = 0.5  # CSF / WM intensity; T1 CSF is far darker than WM ...
CSF_CHECK_MAX_MM = 4.0  # ... where voxels are fine enough to hold pure CSF
FRACTION_RANGES = {"gm": (0.2, 0.75), "wm": (0.15, 0.65), "csf": (0.02, 0.6)}

_ADVICE = ("brainrank expects a skull-stripped T1-weighted brain; check the image (modality, "
           "brain extraction, orientation), or ingest with `tissue` off")


@dataclass
class TissueResult:
    """Tissue of one volume on its output grid.

    Attributes:
        probabilities: float32 (3, X, Y, Z), GM, WM, CSF probabilities in [0, 1], summing to
            1 inside the brain mask and 0 outside.
        corrected: float32 (X, Y, Z) bias-corrected intensities, 0 outside the mask.
        features: float64 (len(TISSUE_FEATURES),).
        seconds: CPU seconds per step ("bias", "register", "em", "features").
        summary: one line for the preprocessing log.
    """

    probabilities: np.ndarray
    corrected: np.ndarray
    features: np.ndarray
    seconds: dict[str, float]
    summary: str


#: The partial-volume classes: (darker, brighter) pure class index in CLASSES order.
_MIXES = ((2, 0), (0, 1), (2, 1))  # CSF/GM, GM/WM, CSF/WM


def _e_step(y: np.ndarray, prior: np.ndarray, mu: np.ndarray, noise: float,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors (N, 5) of the pure (GM, WM, CSF) and mixed (CSF/GM, GM/WM) classes, and the
    mixing fractions alpha (N, 2) of the upper class in each mixed class."""
    n = y.shape[0]
    mean = np.empty(3 + len(_MIXES), dtype=np.float32)
    var = np.empty(3 + len(_MIXES), dtype=np.float32)
    mean[:3] = mu
    var[:3] = noise**2
    for m, (a, b) in enumerate(_MIXES):
        mean[3 + m] = (mu[a] + mu[b]) / 2
        var[3 + m] = noise**2 + (mu[b] - mu[a]) ** 2 / 12.0  # uniform mixing + noise
    d = y[:, None] - mean
    post = prior * (np.exp(-0.5 * d * d / var) / np.sqrt(var))
    post /= np.maximum(post.sum(axis=1, keepdims=True), np.float32(1e-30))
    alpha = np.empty((n, len(_MIXES)), dtype=np.float32)
    for m, (a, b) in enumerate(_MIXES):
        gap = mu[b] - mu[a]
        gap = gap if abs(gap) > 1e-6 else 1e-6  # equal means: any split is as good
        alpha[:, m] = np.clip((y - mu[a]) / gap, 0.0, 1.0)
    return post, alpha


def _pv_prior(priors: np.ndarray, floor: float) -> np.ndarray:
    """(N, 5) spatial weights of the five classes from (N, 3) template GM, WM, CSF maps."""
    p = np.asarray(priors, dtype=np.float32)
    tot = p.sum(axis=1, keepdims=True)
    p = np.where(tot > 1e-3, p / np.maximum(tot, 1e-12), np.float32(1 / 3))
    mixed = [np.sqrt(p[:, a] * p[:, b]) for a, b in _MIXES]  # high where both are present
    full = np.concatenate([p, np.stack(mixed, axis=1)], axis=1)
    full /= full.sum(axis=1, keepdims=True)
    return ((1.0 - floor) * full + floor / full.shape[1]).astype(np.float32)


def fit_em(y: np.ndarray, priors: np.ndarray, *, floor: float = 0.1, iterations: int = 12,
           subsample: int = 4) -> tuple[np.ndarray, np.ndarray, float]:
    """Tissue fractions of intensities ``y`` with a partial-volume mixture fitted by EM.

    Five classes: pure GM, WM, CSF (means ``mu``, one noise SD) and the mixed CSF/GM and
    GM/WM classes (mean halfway, variance noise + a uniform mix: Santago & Gage 1993 in the
    Gaussian form of Shattuck et al. 2001). Each voxel's class weights are its template
    priors (mixed classes: the geometric mean of their two classes) mixed with a uniform
    ``floor``, times per-class weights that EM fits (so a subject's tissue proportions may
    differ from the template's). Parameters are fitted on every ``subsample``-th voxel; the
    fractions come from one final E-step on all voxels: a pure class counts fully, a mixed
    class splits by where ``y`` lies between its two means.

    Args:
        y: (N,) intensities (any scale; e.g. relative to WM).
        priors: (N, 3) template GM, WM, CSF weights per voxel (rows normalised; rows
            summing to ~0 become uniform).
        floor: weight of the uniform prior mixed into every row.
        iterations: EM iterations.
        subsample: fit on every ``subsample``-th voxel.

    Returns:
        (fractions float32 (N, 3) GM, WM, CSF, each row summing to 1; pure-class means (3,);
        noise SD).
    """
    y = np.asarray(y, dtype=np.float32)
    prior = _pv_prior(priors, floor)
    ys, ps = y[::subsample], prior[::subsample]
    w3 = ps[:, :3]
    mu = (w3 * ys[:, None]).sum(0) / w3.sum(0)
    noise = float(np.sqrt(((w3 * (ys[:, None] - mu) ** 2).sum(0) / w3.sum(0)).min()))
    weights = np.ones(3 + len(_MIXES), dtype=np.float32)
    for _ in range(iterations):
        wp = ps * weights
        norm = wp.sum(axis=1, keepdims=True)
        post, _ = _e_step(ys, wp / norm, mu, noise)
        n_k = post.sum(0) + 1e-6
        mu = (post[:, :3] * ys[:, None]).sum(0) / n_k[:3]
        noise = float(np.sqrt(max((post[:, :3] * (ys[:, None] - mu) ** 2).sum() / n_k[:3].sum(),
                                  1e-8)))
        weights = n_k / (ps / norm).sum(0)  # M-step for per-class weights (SPM-style)
        weights /= weights.sum()
    wp = prior * weights
    post, alpha = _e_step(y, wp / wp.sum(axis=1, keepdims=True), mu, noise)
    frac = post[:, :3].copy()
    for m, (a, b) in enumerate(_MIXES):
        frac[:, a] += post[:, 3 + m] * (1.0 - alpha[:, m])
        frac[:, b] += post[:, 3 + m] * alpha[:, m]
    return frac, mu, noise


def check_tissue(dice: float, scale: float, mu: np.ndarray, noise: float,
                 fractions: np.ndarray, source: str, spacing: float = 2.0) -> None:
    """Raise ``QuarantineError("tissue_failed")`` when the classification is not trustworthy.

    Args:
        dice: overlap of the aligned template brain mask with the subject's brain mask.
        scale: linear scale of the subject-to-template map (cube root of its determinant).
        mu: pure-class means (GM, WM, CSF).
        noise: the noise SD of the pure classes (same units as ``mu``).
        fractions: class fractions of the brain mask (GM, WM, CSF).
        source: name for the message.
        spacing: voxel size (mm); the CSF-darkness check needs voxels of at most
            ``CSF_CHECK_MAX_MM`` (coarser voxels hold no pure CSF).
    """
    problems = []
    if not dice >= MIN_DICE:
        problems.append(f"template overlap (Dice) {dice:.3f} < {MIN_DICE}: registration to "
                        f"the MNI template failed or the mask is not a brain")
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        problems.append(f"template scale {scale:.2f} outside {SCALE_RANGE}: the mask is not a "
                        f"brain of human size (a whole head?)")
    g, w, c = mu
    if not c < g < w:
        problems.append(f"class means not ordered CSF < GM < WM as in a T1 image "
                        f"(CSF {c:.3g}, GM {g:.3g}, WM {w:.3g}): wrong modality?")
    else:
        contrast = (w - g) / float(noise)
        if not contrast >= MIN_CONTRAST:
            problems.append(f"GM/WM contrast {contrast:.2f} noise SDs < {MIN_CONTRAST}: "
                            f"no tissue contrast")
        if spacing <= CSF_CHECK_MAX_MM and not c / w <= MAX_CSF_MEAN:
            problems.append(f"CSF intensity {c / w:.2f} of WM > {MAX_CSF_MEAN}: no dark CSF "
                            f"in the mask (not skull-stripped, or the mask cut the CSF away)")
    for name, f in zip(CLASSES, fractions):
        lo, hi = FRACTION_RANGES[name]
        if not lo <= f <= hi:
            problems.append(f"{name.upper()} fraction {f:.3f} outside [{lo}, {hi}]")
    if problems:
        raise QuarantineError("tissue_failed", f"{source}: tissue classification failed: "
                                               f"{'; '.join(problems)}. {_ADVICE}")


def _region_features(lab: np.ndarray, post: np.ndarray, y: np.ndarray) -> list[float]:
    n_r = len(REGIONS) + 1
    count = np.bincount(lab, minlength=n_r).astype(np.float64)
    out = []
    sums = [np.bincount(lab, weights=post[:, c], minlength=n_r) for c in range(3)]
    inten = np.bincount(lab, weights=y, minlength=n_r)
    with np.errstate(invalid="ignore", divide="ignore"):
        for r in range(1, n_r):
            out += [*(s[r] / count[r] for s in sums), inten[r] / count[r]]
    return out  # NaN where a region holds no voxel of this subject


def measure_tissue(intensity: np.ndarray, mask: np.ndarray, affine: np.ndarray, *,
                   bias_shrink_mm: float = 6.0, register_mm: float = 4.0,
                   prior_floor: float = 0.1, source: str = "<array>") -> TissueResult:
    """Bias-correct, align, classify and describe one volume (see the module docstring).

    Args:
        intensity: (X, Y, Z) intensities in scanner units (positive inside ``mask``).
        mask: boolean (X, Y, Z) brain mask.
        affine: 4x4 voxel-to-world affine of the grid (axis-aligned RAS, mm).
        bias_shrink_mm, register_mm, prior_floor: see PreprocessConfig.
        source: name for messages.

    Returns:
        TissueResult.

    Raises:
        QuarantineError: `tissue_failed` (see :func:`check_tissue`).
    """
    from rankcore.mri.n4 import correct_bias, single_thread
    from rankcore.mri.register import pull_template, register_to_template

    spacing = float(affine[0, 0])
    seconds = {}
    with single_thread():
        t = time.process_time()
        corrected, _ = correct_bias(intensity, mask, affine, shrink_mm=bias_shrink_mm)
        seconds["bias"], t = time.process_time() - t, time.process_time()
        matrix = register_to_template(corrected, affine, spacing_mm=register_mm)
        labels, maps = region_labels(min(max(spacing, 1.0), 4.0))
        gm, wm, csf, tmask = pull_template([maps.gm, maps.wm, maps.csf, maps.mask],
                                           maps.affine, matrix, affine, mask.shape)
        (lab,) = pull_template([labels], maps.affine, matrix, affine, mask.shape, order=0)
        seconds["register"], t = time.process_time() - t, time.process_time()
    inside = tmask >= 0.5
    dice = 2.0 * np.count_nonzero(inside & mask) / (np.count_nonzero(inside) + mask.sum())
    y = corrected[mask].astype(np.float64)
    ref = np.median(y[wm[mask] > 0.8]) if np.count_nonzero(wm[mask] > 0.8) > 10 else y.max()
    y /= ref if ref > 0 else 1.0
    priors = np.stack([gm[mask], wm[mask], csf[mask]], axis=1)
    post, mu, noise = fit_em(y, priors, floor=prior_floor)
    seconds["em"], t = time.process_time() - t, time.process_time()
    fractions = post.mean(axis=0, dtype=np.float64)
    scale = float(np.cbrt(np.linalg.det(matrix[:3, :3])))
    check_tissue(dice, scale, mu, noise, fractions, source, spacing)
    w = mu[1]
    voxel_ml = spacing**3 / 1000.0
    n = int(mask.sum())
    feats = [*fractions, *(fractions * n * voxel_ml), n * voxel_ml,
             mu[0] / w, mu[2] / w, noise / w]
    feats += _region_features(lab[mask].astype(np.intp), post, y / w)
    feats += [*matrix[:3, :4].reshape(-1), scale, dice]
    probs = np.zeros((3, *mask.shape), dtype=np.float32)
    for c in range(3):
        probs[c][mask] = post[:, c]
    seconds["features"] = time.process_time() - t
    summary = (f"tissue: N4 bias field, affine to MNI152 (Dice {dice:.3f}, scale {scale:.3f}), "
               f"EM with template priors: GM {fractions[0]:.3f}, WM {fractions[1]:.3f}, "
               f"CSF {fractions[2]:.3f}")  # no timings: the cached text must be reproducible
    return TissueResult(probs, corrected, np.asarray(feats, dtype=np.float64), seconds, summary)


def tissue_of_output(out: np.ndarray, mask: np.ndarray, mean: float, sd: float,
                     affine: np.ndarray, config, source: str) -> TissueResult:
    """Tissue of a z-scored output volume; ``out`` is re-z-scored after bias correction.

    Args:
        out: float32 (X, Y, Z) z-scored intensities, 0 outside ``mask``; overwritten with the
            z-scored bias-corrected intensities (0 outside ``mask``).
        mask: boolean (X, Y, Z) brain mask of the output grid.
        mean, sd: the z-scoring's mean and SD (scanner units): ``out * sd + mean`` is the
            volume before normalisation.
        affine: 4x4 voxel-to-world affine of the output grid.
        config: the PreprocessConfig (its tissue settings).
        source: name for messages.

    Raises:
        QuarantineError: `tissue_failed`.
    """
    raw = out * np.float32(sd) + np.float32(mean)
    inside = raw[mask]
    floor = np.float32(1e-3 * max(float(np.percentile(inside, 99)), 1e-12))
    raw = np.where(mask, np.maximum(raw, floor), np.float32(0.0))  # N4 works on log intensities
    result = measure_tissue(raw, mask, affine, bias_shrink_mm=config.bias_shrink_mm,
                            register_mm=config.register_mm,
                            prior_floor=config.tissue_prior_floor, source=source)
    vals = result.corrected[mask].astype(np.float64)
    m, s = float(vals.mean()), float(vals.std())
    out[...] = 0.0
    out[mask] = ((vals - m) / (s if s > 0 else 1.0)).astype(np.float32)
    return result
