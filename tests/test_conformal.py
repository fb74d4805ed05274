"""Split-conformal intervals: coverage near nominal on many synthetic subjects whose errors
grow with age, wider intervals where errors are larger, and the guarantees' edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from rankcore.conformal import ConformalInterval, fit_conformal, interval_coverage
from rankcore.errors import InputError


def _subjects(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ages 20-85; estimates whose error SD grows from ~1.5 y at 20 to ~6 y at 85."""
    age = rng.uniform(20, 85, n)
    pred = age + rng.normal(0, 1.0 + 0.06 * (age - 10), n)
    return pred, age


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95])
def test_coverage_on_test_subjects_is_near_nominal(level):
    rng = np.random.default_rng(0)
    train, val, test = _subjects(2000, rng), _subjects(1000, rng), _subjects(20000, rng)
    rule = fit_conformal(*val, scale_pred=train[0], scale_ages=train[1], level=level)
    assert rule.exact and rule.n_calibration == 1000
    low, high = rule.bounds(test[0])
    cov = interval_coverage(low, high, test[1])
    assert cov["n"] == 20000
    assert level - 0.03 <= cov["coverage"] <= level + 0.03  # 90 %: 87-93 %
    # the interval widens with the estimate, as the errors do
    assert rule.b > 0
    young, old = test[0] < 35, test[0] > 70
    assert np.mean((high - low)[old]) > 2 * np.mean((high - low)[young])
    # and the coverage holds in both age groups, not only on average
    for group in (young, old):
        inside = (test[1][group] >= low[group]) & (test[1][group] <= high[group])
        assert abs(inside.mean() - level) < 0.05


def test_average_coverage_over_many_small_calibration_sets_is_at_least_nominal():
    rng = np.random.default_rng(1)
    covered = []
    for _ in range(300):
        cal, new = _subjects(30, rng), _subjects(200, rng)
        rule = fit_conformal(*cal, level=0.9)  # constant scale
        covered.append(interval_coverage(*rule.bounds(new[0]), new[1])["coverage"])
    # the guarantee: between level and level + 1/(n + 1), on average over calibration sets
    assert 0.9 - 0.01 <= float(np.mean(covered)) <= 0.9 + 1 / 31 + 0.01


def test_round_trip_nan_and_bad_input():
    rule = fit_conformal([50, 52, 61, 40, 70], [51, 50, 60, 44, 73], level=0.5)
    again = ConformalInterval.from_dict(rule.to_dict())
    assert again == rule
    low, high = rule.bounds([np.nan, 60.0])
    assert np.isnan(low[0]) and low[1] < 60 < high[1]
    small = fit_conformal([50, 60, 70], [51, 59, 75], level=0.9)
    assert not small.exact  # 3 subjects cannot calibrate a 90 % interval
    with pytest.raises(InputError, match="`level` must be"):
        fit_conformal([1, 2], [1, 2], level=1.0)
    with pytest.raises(InputError, match="at least 2"):
        fit_conformal([1, np.nan], [1, 2])
    with pytest.raises(InputError, match="same length"):
        fit_conformal([1, 2, 3], [1, 2])
    assert interval_coverage([np.nan], [np.nan], [1.0]) == {"n": 0, "coverage": None,
                                                            "mean_width": None}
