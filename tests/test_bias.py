"""Brain-age bias correction (both forms) and the seeded bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from rankcore.bias import BiasCorrection, fit_bias_correction
from rankcore.bootstrap import bootstrap_ci, bootstrap_distribution
from rankcore.errors import InputError, ShapeError
from rankcore.metrics import mae, srcc


def _biased(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ages 20-80 and predictions regressed towards the mean (slope 0.7) plus noise."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    return 0.7 * age + 15.0 + rng.normal(0, 3, n), age


def test_fit_recovers_an_exact_line_in_both_forms():
    age = np.array([20.0, 35.0, 50.0, 65.0, 80.0])
    c = fit_bias_correction(0.8 * age + 10.0, age)
    assert c.a == pytest.approx(0.8) and c.b == pytest.approx(10.0)
    assert c.alpha == pytest.approx(-0.2) and c.beta == pytest.approx(10.0)
    assert (c.n, c.age_min, c.age_max, c.fitted_on) == (5, 20.0, 80.0, "val")


def test_fit_equals_scipy_linregress_of_gap_and_of_prediction():
    pred, age = _biased()
    c = fit_bias_correction(pred, age)
    gap_fit = scipy.stats.linregress(age, pred - age)
    cole_fit = scipy.stats.linregress(age, pred)
    assert c.alpha == pytest.approx(gap_fit.slope, rel=1e-12)
    assert c.beta == pytest.approx(gap_fit.intercept, rel=1e-12)
    assert c.a == pytest.approx(cole_fit.slope, rel=1e-12)
    assert c.b == pytest.approx(cole_fit.intercept, rel=1e-12)


def test_corrections_remove_the_age_trend_on_the_fitting_set():
    pred, age = _biased()
    c = fit_bias_correction(pred, age)
    assert scipy.stats.pearsonr(pred - age, age).statistic < -0.5  # biased before
    for method in ("beheshti", "cole"):
        gap = c.apply(pred, age, method) - age
        assert abs(scipy.stats.pearsonr(gap, age).statistic) < 1e-10
        assert abs(gap.mean()) < 1e-9
    # Beheshti = age + residual; Cole = age + residual / a.
    residual = pred - (c.a * age + c.b)
    np.testing.assert_allclose(c.apply(pred, age, "beheshti"), age + residual, atol=1e-9)
    np.testing.assert_allclose(c.apply(pred, age, "cole"), age + residual / c.a, atol=1e-9)


def test_apply_uses_only_the_stored_coefficients():
    pred, age = _biased()
    c = fit_bias_correction(pred[:30], age[:30])
    out = c.apply(pred[30:], age[30:])
    np.testing.assert_allclose(out, pred[30:] - (c.alpha * age[30:] + c.beta))
    t = c.apply(torch.tensor(pred[30:]), torch.tensor(age[30:]), "cole")
    np.testing.assert_allclose(t, (pred[30:] - c.b) / c.a)


def test_dict_round_trip_through_json():
    c = fit_bias_correction(*_biased())
    again = BiasCorrection.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    with pytest.raises(InputError, match="format"):
        BiasCorrection.from_dict({"alpha": 1.0})
    with pytest.raises(InputError, match="'n'"):
        BiasCorrection.from_dict({k: v for k, v in c.to_dict().items() if k != "n"})


def test_cole_is_refused_when_predictions_do_not_rise_with_age():
    age = np.array([20.0, 40.0, 60.0, 80.0])
    c = fit_bias_correction(np.array([60.0, 55.0, 50.0, 45.0]), age)
    assert not c.cole_defined
    with pytest.raises(InputError, match="positive slope"):
        c.apply([50.0], [30.0], "cole")
    assert c.apply([50.0], [30.0], "beheshti").shape == (1,)


@pytest.mark.parametrize(("pred", "age", "error", "match"), [
    ([1.0], [1.0], InputError, "at least 2"),
    ([1.0, 2.0, 3.0], [40.0, 40.0, 40.0], InputError, "must vary"),
    ([1.0, float("nan")], [20.0, 30.0], InputError, "finite"),
    ([1.0, 2.0], [20.0, 30.0, 40.0], ShapeError, "same shape"),
    ([[1.0, 2.0]], [[20.0, 30.0]], ShapeError, "one-dimensional"),
])
def test_fit_rejects_bad_input(pred, age, error, match):
    with pytest.raises(error, match=match):
        fit_bias_correction(pred, age)


def test_apply_rejects_unknown_method():
    c = fit_bias_correction(*_biased())
    with pytest.raises(InputError, match="`method`"):
        c.apply([1.0], [1.0], "smith")


# ---- bootstrap --------------------------------------------------------------------------


def test_bootstrap_matches_a_looped_reference_with_the_same_resamples():
    pred, age = _biased(40, seed=3)
    values = bootstrap_distribution(mae, pred, age, n=300, seed=7)
    idx = np.random.default_rng(7).integers(0, 40, size=(300, 40))
    ref = np.array([np.abs(pred[i] - age[i]).mean() for i in idx])
    np.testing.assert_allclose(values, ref, rtol=1e-12)
    low, high = bootstrap_ci(mae, pred, age, n=300, seed=7, level=0.9)
    assert (low, high) == pytest.approx(tuple(np.percentile(ref, [5.0, 95.0])))


def test_bootstrap_batched_equals_unbatched_for_srcc_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(20, 30, 25).astype(float)  # integer ages: many ties
    b = a + rng.normal(0, 2, 25)
    batched = bootstrap_distribution(srcc, a, b, n=200, seed=2)
    looped = bootstrap_distribution(lambda x, y: scipy.stats.spearmanr(x, y).statistic, a, b,
                                    n=200, seed=2, batched=False)
    np.testing.assert_allclose(batched, looped, rtol=1e-10, equal_nan=True)


def test_bootstrap_is_seeded_and_nested_by_level():
    pred, age = _biased()
    assert bootstrap_ci(mae, pred, age, seed=4) == bootstrap_ci(mae, pred, age, seed=4)
    assert bootstrap_ci(mae, pred, age, seed=4) != bootstrap_ci(mae, pred, age, seed=5)
    wide = bootstrap_ci(mae, pred, age, level=0.95)
    narrow = bootstrap_ci(mae, pred, age, level=0.5)
    point = float(mae(pred, age))
    assert wide[0] <= narrow[0] <= point <= narrow[1] <= wide[1]


def test_bootstrap_degenerate_and_bad_arguments():
    low, high = bootstrap_ci(srcc, [1.0], [2.0], n=20)  # one subject: every SRCC is NaN
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(InputError, match="`n`"):
        bootstrap_ci(mae, [1.0, 2.0], [1.0, 2.0], n=0)
    with pytest.raises(InputError, match="`level`"):
        bootstrap_ci(mae, [1.0, 2.0], [1.0, 2.0], level=1.0)
    with pytest.raises(ShapeError, match="same length"):
        bootstrap_ci(mae, [1.0, 2.0], [1.0])
    with pytest.raises(ShapeError, match="batched=False"):
        bootstrap_ci(lambda p, a: float(np.mean(p - a)), [1.0, 2.0], [1.0, 3.0])
