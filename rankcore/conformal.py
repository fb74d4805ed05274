"""Split-conformal prediction intervals for brain age, allowed to widen with the estimate.

Method (normalised split-conformal regression; Lei et al., "Distribution-free predictive
inference for regression", JASA 2018, section 5.2): a scale function s(ŷ) = max(a + b·ŷ, s₀)
is fitted on data the calibration set does not contain (the training subjects' absolute
residuals), then the calibration (validation) subjects give the scores |y − ŷ| / s(ŷ), and
q is their ⌈(n + 1)·level⌉-th smallest value. The interval of a new estimate is
ŷ ± q·s(ŷ). When calibration and new subjects are exchangeable, it covers the true age with
probability at least ``level`` (and below level + 1/(n + 1)), whatever the model; the scale
only decides where the width goes (older brains, whose estimates scatter more, get wider
intervals).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rankcore.errors import InputError

__all__ = ["INTERVAL_LEVEL", "ConformalInterval", "fit_conformal", "interval_coverage",
           "load_interval"]

#: Nominal coverage of the interval stored in every model card.
INTERVAL_LEVEL = 0.9

_SCALE_FLOOR = 0.25  # s₀ as a share of the median fitted scale: no zero-width intervals


def _finite_pairs(pred: Any, ages: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(ages, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise InputError(f"`{name}` predictions and ages must have the same length, got "
                         f"{len(p)} and {len(y)}")
    keep = np.isfinite(p) & np.isfinite(y)
    return p[keep], y[keep]


@dataclass(frozen=True)
class ConformalInterval:
    """A fitted interval rule: ŷ ± q·max(a + b·ŷ, s₀).

    Attributes:
        level: nominal coverage in (0, 1).
        q: the calibrated quantile of the normalised scores.
        a, b: scale intercept (years) and slope (per year of estimate).
        s0: the scale's floor (years).
        n_calibration: calibration subjects.
        exact: False when n_calibration was too small for the ⌈(n + 1)·level⌉-th score to
            exist (the largest score is used; coverage is then not guaranteed).
    """

    level: float
    q: float
    a: float
    b: float
    s0: float
    n_calibration: int
    exact: bool = True

    def scale(self, pred: Any) -> np.ndarray:
        """s(ŷ) in years, (N,)."""
        p = np.asarray(pred, dtype=np.float64)
        return np.maximum(self.a + self.b * p, self.s0)

    def bounds(self, pred: Any) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) in years for estimates ``pred`` (N,); NaN stays NaN."""
        p = np.asarray(pred, dtype=np.float64)
        half = self.q * self.scale(p)
        return p - half, p + half

    def to_dict(self) -> dict[str, Any]:
        return {"method": "split_conformal_normalised", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalInterval:
        return cls(float(d["level"]), float(d["q"]), float(d["a"]), float(d["b"]),
                   float(d["s0"]), int(d["n_calibration"]), bool(d.get("exact", True)))


def fit_conformal(cal_pred: Any, cal_ages: Any, *, scale_pred: Any = None,
                  scale_ages: Any = None, level: float = 0.9) -> ConformalInterval:
    """Calibrate an interval on held-out subjects (see the module docstring).

    Args:
        cal_pred, cal_ages: (n,) estimates and true ages of the calibration subjects (the
            validation split), years; non-finite pairs are dropped.
        scale_pred, scale_ages: (m,) estimates and ages of OTHER subjects (the training
            split) to fit the scale's slope on; None (or fewer than 3): a constant scale.
        level: nominal coverage in (0, 1).

    Returns:
        The :class:`ConformalInterval`.

    Raises:
        InputError: ``level`` outside (0, 1), fewer than 2 calibration subjects, or
            mismatched lengths.
    """
    if isinstance(level, bool) or not 0.0 < float(level) < 1.0:
        raise InputError(f"`level` must be a number in (0, 1), got {level!r}")
    p, y = _finite_pairs(cal_pred, cal_ages, "calibration")
    if len(p) < 2:
        raise InputError(f"`cal_pred` must hold at least 2 subjects with an age, got {len(p)}")
    a, b = 1.0, 0.0
    if scale_pred is not None and scale_ages is not None:
        sp, sy = _finite_pairs(scale_pred, scale_ages, "scale")
        if len(sp) >= 3 and float(np.ptp(sp)) > 0:
            b, a = (float(v) for v in np.polyfit(sp, np.abs(sy - sp), 1))
            if a + b * float(np.median(sp)) <= 0:  # a degenerate fit: keep a constant scale
                a, b = 1.0, 0.0
    mid = a + b * float(np.median(p))
    s0 = _SCALE_FLOOR * mid if mid > 0 else 1.0
    rule = ConformalInterval(float(level), 0.0, a, b, s0, len(p))
    scores = np.sort(np.abs(y - p) / rule.scale(p))
    k = math.ceil((len(p) + 1) * float(level))
    exact = k <= len(p)
    q = float(scores[min(k, len(p)) - 1])
    return ConformalInterval(float(level), q, a, b, s0, len(p), exact)


def interval_coverage(low: Any, high: Any, ages: Any) -> dict[str, Any]:
    """Share of subjects whose age lies in [low, high], over subjects with an age.

    Returns:
        ``n`` (subjects with an age and an interval), ``coverage`` (None when n is 0) and
        ``mean_width`` (years).
    """
    lo, hi = np.asarray(low, np.float64), np.asarray(high, np.float64)
    y = np.asarray(ages, np.float64)
    keep = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
    n = int(keep.sum())
    if n == 0:
        return {"n": 0, "coverage": None, "mean_width": None}
    inside = (y[keep] >= lo[keep]) & (y[keep] <= hi[keep])
    return {"n": n, "coverage": float(inside.mean()),
            "mean_width": float(np.mean(hi[keep] - lo[keep]))}


def load_interval(card: dict[str, Any]) -> ConformalInterval | None:
    """The interval rule a model card stores (``card["interval"]``), or None without one."""
    blob = card.get("interval")
    return ConformalInterval.from_dict(blob) if isinstance(blob, dict) else None
