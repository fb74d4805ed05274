"""The metrics block of an evaluation report, each value with a bootstrap confidence interval.

:func:`metric_block` scores one set of (predicted, chronological) ages; :func:`build_metrics`
assembles the report's ``metrics.json``: the cascade's block at the top level, stage 1's block
beside it, the bias-corrected blocks (correction fitted on the validation split only, both the
Beheshti/Smith and the Cole form), and one block per site.

Metric names (FIELD.md, "Brain-age practice"):

* ``mae``, ``rmse`` (years); ``pearson_r``, ``srcc`` (Spearman, average ranks for ties);
  ``r2`` (``1 - SS_res / SS_tot`` of the predictions against the ages);
* ``mean_bias``: mean brain-age gap ``mean(pred - age)`` (years);
* ``gap_age_corr``: Pearson correlation of the gap ``pred - age`` with age (the regression to
  the mean that bias correction removes).

Every value is a float or None (NaN, e.g. a correlation of fewer than two subjects, becomes
None so that the JSON stays standard). Subjects without an age are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rankcore.bias import BiasCorrection, fit_bias_correction
from rankcore.bootstrap import bootstrap_ci
from rankcore.errors import InputError, ShapeError
from rankcore.metrics import mae, pearson_r, r2, rmse, srcc

__all__ = ["METRICS", "METRIC_NAMES", "build_metrics", "gap_age_corr", "mean_bias",
           "metric_block"]


def mean_bias(pred: Any, age: Any) -> Any:
    """Mean brain-age gap ``mean(pred - age)`` over the last axis (years); batched."""
    p, a = np.asarray(pred, dtype=np.float64), np.asarray(age, dtype=np.float64)
    out = (p - a).mean(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def gap_age_corr(pred: Any, age: Any) -> Any:
    """Pearson correlation of the gap ``pred - age`` with ``age`` over the last axis; batched."""
    p, a = np.asarray(pred, dtype=np.float64), np.asarray(age, dtype=np.float64)
    return pearson_r(p - a, a)


#: name -> statistic(pred, age), each accepting (B, N) arrays and returning (B,) values.
METRICS: dict[str, Callable[[Any, Any], Any]] = {
    "mae": mae,
    "rmse": rmse,
    "pearson_r": pearson_r,
    "srcc": srcc,
    "r2": r2,
    "mean_bias": mean_bias,
    "gap_age_corr": gap_age_corr,
}
METRIC_NAMES = tuple(METRICS)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _scored(pred: Any, age: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    a = np.asarray(age, dtype=np.float64)
    if p.ndim != 1 or p.shape != a.shape:
        raise ShapeError(f"`pred` and `age` must be 1-D of the same length, got shapes "
                         f"{p.shape} and {a.shape}")
    if not np.isfinite(p).all():
        raise InputError(f"`pred` must be finite, got {int((~np.isfinite(p)).sum())} NaN or "
                         "inf prediction(s)")
    known = np.isfinite(a)
    return p[known], a[known]


def metric_block(pred: Any, age: Any, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, Any]:
    """Every metric of :data:`METRICS` with its percentile-bootstrap interval.

    Args:
        pred: predicted ages (N,), years, finite.
        age: chronological ages (N,), years; NaN marks an unknown age (not scored).
        n_boot: bootstrap resamples (0: no intervals).
        seed: seeds the resampling (all metrics see the same resamples).
        level: interval coverage.

    Returns:
        ``{"n": scored subjects, "<metric>": value, ..., "ci": {"level", "n_boot", "seed",
        "<metric>": [low, high], ...}}``; values are None where undefined (and every metric
        is None when no subject has an age).
    """
    p, a = _scored(pred, age)
    out: dict[str, Any] = {"n": len(p)}
    ci: dict[str, Any] = {"level": level, "n_boot": n_boot, "seed": seed}
    for name, fn in METRICS.items():
        if len(p) == 0:
            out[name], ci[name] = None, [None, None]
            continue
        out[name] = _num(fn(p, a))
        if n_boot > 0:
            low, high = bootstrap_ci(fn, p, a, n=n_boot, seed=seed, level=level)
            ci[name] = [_num(low), _num(high)]
        else:
            ci[name] = [None, None]
    out["ci"] = ci
    return out


def _site_names(site: Sequence[str | None], n: int) -> list[str]:
    if len(site) != n:
        raise ShapeError(f"`site` must have {n} values, got {len(site)}")
    return ["n/a" if s is None or s == "" else str(s) for s in site]


def build_metrics(pred: Any, stage1: Any, age: Any, site: Sequence[str | None], *,
                  val_pred: Any = None, val_age: Any = None, n_boot: int = 1000,
                  seed: int = 0, level: float = 0.95,
                  correction: BiasCorrection | None = None) -> dict[str, Any]:
    """The metrics of an evaluated split, as written to ``metrics.json``.

    The bias correction is fitted on ``val_pred`` / ``val_age`` (the VALIDATION split's
    cascade predictions) and only applied to the evaluated split: nothing about the evaluated
    split enters the coefficients. A ``correction`` fitted earlier on the same validation
    split may be given instead.

    Args:
        pred: cascade predictions (N,) of the evaluated split, years.
        stage1: stage-1 predictions (N,), years.
        age: chronological ages (N,), years (NaN: unknown, not scored).
        site: N site labels (None: unknown, grouped as ``"n/a"``).
        val_pred, val_age: the validation split's cascade predictions and ages (M,).
        n_boot, seed, level: bootstrap settings (see :func:`metric_block`).
        correction: a correction fitted on the validation split (instead of ``val_*``).

    Returns:
        ``{<cascade metric_block keys>, "stage1": block, "bias_corrected": {...},
        "per_site": {site: block + "stage1_mae"}}``. ``bias_corrected`` holds
        ``available``, ``fitted_on``, ``coefficients`` (:meth:`BiasCorrection.to_dict`),
        ``beheshti`` (block) and ``cole`` (block, or None when its slope is not positive), or
        ``available: False`` and a ``reason``.
    """
    p = np.asarray(pred, dtype=np.float64)
    s1 = np.asarray(stage1, dtype=np.float64)
    a = np.asarray(age, dtype=np.float64)
    if not (p.shape == s1.shape == a.shape) or p.ndim != 1:
        raise ShapeError(f"`pred`, `stage1` and `age` must be 1-D of the same length, got "
                         f"{p.shape}, {s1.shape} and {a.shape}")
    sites = _site_names(site, len(p))
    kw = {"n_boot": n_boot, "seed": seed, "level": level}
    out = metric_block(p, a, **kw)
    out["n_without_age"] = int((~np.isfinite(a)).sum())
    out["stage1"] = metric_block(s1, a, **kw)

    if correction is None and val_pred is not None:
        correction = fit_bias_correction(val_pred, val_age, fitted_on="val")
    if correction is None:
        out["bias_corrected"] = {"available": False,
                                 "reason": "no validation predictions to fit it on"}
    else:
        known = np.isfinite(a)
        beheshti = np.full_like(p, np.nan)
        beheshti[known] = correction.apply(p[known], a[known], "beheshti")
        block: dict[str, Any] = {
            "available": True, "fitted_on": correction.fitted_on, "n_fit": correction.n,
            "coefficients": correction.to_dict(),
            "beheshti": metric_block(beheshti[known], a[known], **kw)}
        if correction.cole_defined:
            cole = correction.apply(p[known], a[known], "cole")
            block["cole"] = metric_block(cole, a[known], **kw)
        else:
            block["cole"] = None
            block["cole_reason"] = (f"slope a = {correction.a:.4g} of the prediction on age is "
                                    "not positive; Cole's form cannot be inverted")
        out["bias_corrected"] = block

    per_site: dict[str, Any] = {}
    names = np.asarray(sites)
    for name in sorted(set(sites)):
        idx = np.flatnonzero(names == name)
        block = metric_block(p[idx], a[idx], **kw)
        block["stage1_mae"] = metric_block(s1[idx], a[idx], n_boot=0)["mae"]
        per_site[name] = block
    out["per_site"] = per_site
    return out
