"""Brain-age bias correction: the linear age trend of the brain-age gap, fitted and removed.

A brain-age model regresses towards the mean age: it over-estimates the young and
under-estimates the old, so its gap ``pred - age`` correlates with age. The field removes that
trend with a line fitted on a held-out healthy set (here: the validation split, never the
test split — a correction fitted on the data it is judged on flatters the model). Both forms
in use are fitted by ordinary least squares on the same (pred, age) pairs:

* Beheshti et al. 2019 / Smith et al. 2019: ``gap = alpha * age + beta``;
  ``corrected = pred - (alpha * age + beta)``.
* Cole et al. 2018: ``pred = a * age + b``; ``corrected = (pred - b) / a``.

With least squares ``alpha = a - 1`` and ``beta = b``, so the Beheshti correction is
``age + residual`` and Cole's is ``age + residual / a``: both leave a gap uncorrelated with age
on the fitting set, Cole's scales the residuals up by ``1 / a``. Cole's form needs ``a > 0``
(a model whose predictions do not rise with age cannot be inverted); with ``a <= 0``
:meth:`BiasCorrection.apply` refuses it and :attr:`BiasCorrection.cole_defined` is False.

Corrected metrics flatter a model (the correction uses the true age): report both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from rankcore.errors import InputError, ShapeError

__all__ = ["BIAS_FORMAT", "METHODS", "BiasCorrection", "fit_bias_correction"]

BIAS_FORMAT = "brainrank-bias/1"
METHODS = ("beheshti", "cole")
Method = Literal["beheshti", "cole"]


def _vector(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 vector (tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be numbers (years), got {type(x).__name__}") from None
    if arr.ndim != 1:
        raise ShapeError(f"`{name}` must be one-dimensional (N,), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"`{name}` must be finite, got {int((~np.isfinite(arr)).sum())} "
                         "NaN or inf value(s)")
    return arr


def _pair(pred: Any, age: Any) -> tuple[np.ndarray, np.ndarray]:
    p, a = _vector(pred, "pred"), _vector(age, "age")
    if p.shape != a.shape:
        raise ShapeError(f"`pred` and `age` must have the same shape, got {p.shape} and "
                         f"{a.shape}")
    return p, a


@dataclass(frozen=True)
class BiasCorrection:
    """A fitted linear age-bias correction, holding both published forms.

    Attributes:
        alpha: Beheshti/Smith slope of the gap on age (per year).
        beta: Beheshti/Smith intercept (years).
        a: Cole slope of the prediction on age (dimensionless).
        b: Cole intercept (years).
        n: number of subjects it was fitted on.
        age_min, age_max: age range (years) of the fitting set; outside it the line is
            extrapolated.
        fitted_on: which data it was fitted on (``"val"`` in evaluation).
    """

    alpha: float
    beta: float
    a: float
    b: float
    n: int
    age_min: float
    age_max: float
    fitted_on: str = "val"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "a", "b", "age_min", "age_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise InputError(f"`{name}` must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise InputError(f"`n` must be an integer >= 2, got {self.n!r}")
        if not isinstance(self.fitted_on, str):
            raise InputError(f"`fitted_on` must be a string, got {self.fitted_on!r}")

    @property
    def cole_defined(self) -> bool:
        """Whether Cole's form can be applied (the prediction rises with age: ``a > 0``)."""
        return self.a > 0

    def apply(self, pred: Any, age: Any, method: Method = "beheshti") -> np.ndarray:
        """Bias-corrected predicted ages (years).

        Args:
            pred: predicted ages (N,), years.
            age: chronological ages (N,), years (both forms need them: Beheshti to evaluate
                the trend, Cole only through the corrected gap; Cole's corrected age itself
                does not use ``age``, but it is checked for shape all the same).
            method: ``"beheshti"`` (default) or ``"cole"``.

        Returns:
            float64 (N,) corrected ages; the corrected gap is this minus ``age``.

        Raises:
            InputError: non-finite input, an unknown method, or Cole's form with ``a <= 0``.
            ShapeError: inputs of different shapes or not 1-D.
        """
        if method not in METHODS:
            raise InputError(f"`method` must be one of {', '.join(map(repr, METHODS))}, "
                             f"got {method!r}")
        p, a = _pair(pred, age)
        if method == "beheshti":
            return p - (self.alpha * a + self.beta)
        if not self.cole_defined:
            raise InputError(f"Cole's correction needs a positive slope of the prediction on "
                             f"age, got a = {self.a:.4g}: the model's predictions do not rise "
                             "with age; use method='beheshti'")
        return (p - self.b) / self.a

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (with a ``format`` tag); :meth:`from_dict` inverts it."""
        return {"format": BIAS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BiasCorrection:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            InputError: not a bias-correction dict, or missing / invalid values.
        """
        if not isinstance(d, dict) or d.get("format") != BIAS_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise InputError(f"a bias correction must be a dict with format {BIAS_FORMAT!r}, "
                             f"got {got!r}")
        try:
            return cls(alpha=d["alpha"], beta=d["beta"], a=d["a"], b=d["b"], n=d["n"],
                       age_min=d["age_min"], age_max=d["age_max"],
                       fitted_on=d.get("fitted_on", "val"))
        except KeyError as err:
            raise InputError(f"a bias correction dict must hold {err.args[0]!r}") from None


def fit_bias_correction(pred: Any, age: Any, *, fitted_on: str = "val") -> BiasCorrection:
    """Fit both linear bias corrections by least squares on (pred, age) pairs.

    Call it with the VALIDATION split's predictions: fitting on the test split makes the
    corrected test metrics meaningless.

    Args:
        pred: predicted ages (N,), years, N >= 2.
        age: chronological ages (N,), years; must vary.
        fitted_on: recorded in the result (which split it came from).

    Returns:
        The :class:`BiasCorrection` (``alpha = a - 1``, ``beta = b``).

    Raises:
        InputError: fewer than two subjects, non-finite values, or constant ages.
        ShapeError: inputs of different shapes or not 1-D.
    """
    p, a = _pair(pred, age)
    if len(p) < 2:
        raise InputError(f"`pred` must hold at least 2 subjects to fit a bias correction, "
                         f"got {len(p)}")
    a_mean = a.mean()
    ac = a - a_mean
    sxx = float(ac @ ac)
    if sxx == 0.0 or np.all(a == a[0]):
        raise InputError(f"`age` must vary to fit a bias correction, got {len(a)} subjects "
                         f"all aged {a[0]:g}")
    slope = float(ac @ (p - p.mean())) / sxx
    intercept = float(p.mean() - slope * a_mean)
    return BiasCorrection(alpha=slope - 1.0, beta=intercept, a=slope, b=intercept, n=len(p),
                          age_min=float(a.min()), age_max=float(a.max()), fitted_on=fitted_on)
