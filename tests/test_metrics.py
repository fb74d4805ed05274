"""rankcore.metrics against scipy / numpy references, batched, with ties and degenerate input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rankcore.errors import InputError, ShapeError
from rankcore.metrics import mae, pearson_r, r2, rmse, srcc

FAST = settings(max_examples=50, deadline=None)


@st.composite
def paired_batches(draw, low=0, high=4):
    """Two (B, N) float64 arrays of small integers (heavy ties), B in 1..5, N in 2..15."""
    shape = draw(st.tuples(st.integers(1, 5), st.integers(2, 15)))
    elements = st.integers(low, high)
    a = draw(hnp.arrays(np.float64, shape, elements=elements))
    b = draw(hnp.arrays(np.float64, shape, elements=elements))
    return a, b


def _scipy_rows(fn, a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant rows, then returns NaN
        return np.array([fn(a[i], b[i]).statistic for i in range(a.shape[0])])


@FAST
@given(pair=paired_batches())
def test_srcc_equals_scipy_spearmanr_on_tied_data(pair):
    a, b = pair
    got = srcc(a, b)
    assert isinstance(got, np.ndarray) and got.shape == (a.shape[0],)
    np.testing.assert_allclose(got, _scipy_rows(scipy.stats.spearmanr, a, b), atol=1e-6)
    # tensors in, tensors out; same numbers; batched == row by row
    got_t = srcc(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float64
    np.testing.assert_allclose(got_t.numpy(), got, atol=1e-12)
    for i in range(a.shape[0]):
        np.testing.assert_allclose(srcc(a[i], b[i]), got[i], atol=1e-12)


@FAST
@given(pair=paired_batches(-20, 20))
def test_pearson_equals_scipy(pair):
    a, b = pair
    np.testing.assert_allclose(pearson_r(a, b), _scipy_rows(scipy.stats.pearsonr, a, b),
                               atol=1e-10)


@FAST
@given(pair=paired_batches(-50, 50))
def test_errors_and_r2_equal_numpy_formulas(pair):
    p, t = pair
    np.testing.assert_allclose(mae(p, t), np.abs(p - t).mean(-1), rtol=1e-12)
    np.testing.assert_allclose(rmse(p, t), np.sqrt(((p - t) ** 2).mean(-1)), rtol=1e-12)
    ss_tot = ((t - t.mean(-1, keepdims=True)) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(ss_tot > 0, 1 - ((t - p) ** 2).sum(-1) / ss_tot, np.nan)
    np.testing.assert_allclose(r2(p, t), expected, rtol=1e-10, atol=1e-12)


@FAST
@given(pair=paired_batches(), seed=st.integers(0, 2**32 - 1))
def test_correlations_are_invariant_to_joint_permutation(pair, seed):
    a, b = pair
    perm = np.random.default_rng(seed).permutation(a.shape[1])
    np.testing.assert_allclose(srcc(a[:, perm], b[:, perm]), srcc(a, b), atol=1e-12)
    np.testing.assert_allclose(pearson_r(a[:, perm], b[:, perm]), pearson_r(a, b), atol=1e-12)


def test_dim_argument_and_float32_kept():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.integers(0, 5, (9, 4)).astype(np.float32))  # N along dim 0
    b = torch.from_numpy(rng.integers(0, 5, (9, 4)).astype(np.float32))
    got = srcc(a, b, dim=0)
    assert got.shape == (4,) and got.dtype == torch.float32
    expected = _scipy_rows(scipy.stats.spearmanr, a.numpy().T, b.numpy().T)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert mae(a, b, dim=0).shape == (4,)


def test_output_kinds():
    a, b = [1.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 3.0]
    for fn in (srcc, pearson_r, mae, rmse, r2):
        assert isinstance(fn(np.array(a), np.array(b)), float)
        assert isinstance(fn(a, b), float)  # sequences count as arrays
        out = fn(torch.tensor(a), torch.tensor(b))
        assert isinstance(out, torch.Tensor) and out.ndim == 0
        mixed = fn(torch.tensor(a), np.array(b))
        assert isinstance(mixed, torch.Tensor)
        assert isinstance(fn(np.array([a, b]), np.array([b, a])), np.ndarray)


def test_constant_input_gives_nan_like_scipy_never_a_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(scipy.stats.spearmanr([2, 2, 2], [1, 2, 3]).statistic)
    assert np.isnan(srcc([2, 2, 2], [1, 2, 3]))
    assert np.isnan(pearson_r([0.1, 0.1, 0.1], [1, 2, 3]))  # rounding residue must not leak
    assert np.isnan(pearson_r([1.0, 2.0, 3.0], [7.0, 7.0, 7.0]))
    assert np.isnan(r2([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert np.isnan(srcc([1.0], [2.0]))  # a single pair is constant too
    batch = srcc(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]),
                 torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert torch.isnan(batch[0]) and batch[1].item() == -1.0


def test_perfect_and_reversed_order():
    x = np.array([3.0, 1.0, 2.0, 2.0, 9.0])
    assert srcc(x, x**3) == pytest.approx(1.0)
    assert srcc(x, -x) == pytest.approx(-1.0)
    assert r2(x, x) == 1.0 and mae(x, x) == 0.0 and rmse(x, x) == 0.0


def test_gradcheck_differentiable_metrics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    for fn in (pearson_r, mae, rmse, r2):
        assert torch.autograd.gradcheck(lambda x, y, fn=fn: fn(x, y), (a, b))
    out = srcc(a, b)
    assert not out.requires_grad


def test_validation_messages():
    with pytest.raises(ShapeError, match="`a` and `b` must have the same shape"):
        srcc(np.zeros(3), np.zeros(4))
    with pytest.raises(ShapeError, match="same shape"):
        mae(torch.zeros(4, 1), torch.zeros(4))  # no broadcasting
    with pytest.raises(InputError, match="`pred` must be finite"):
        rmse([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(InputError, match="`b` must be finite"):
        srcc([1.0, 2.0], [1.0, float("inf")])
    with pytest.raises(ShapeError, match="0-d"):
        pearson_r(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ShapeError, match="non-empty"):
        r2(np.zeros((2, 0)), np.zeros((2, 0)))
    with pytest.raises(InputError, match="`a` must be"):
        srcc("abc", [1, 2, 3])


@pytest.mark.gpu
def test_cuda_metrics_match_cpu_and_stay_on_device():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (8, 30), generator=g).float()
    b = torch.randint(0, 5, (8, 30), generator=g).float()
    for fn in (srcc, pearson_r, mae, rmse, r2):
        out = fn(a.to("cuda"), b.to("cuda"))
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), fn(a, b), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_torch_and_numpy_correlation_kernels_agree():
    """srcc runs its correlation in numpy on the CPU and in torch elsewhere: same numbers."""
    from rankcore import metrics

    rng = np.random.default_rng(7)
    x = rng.integers(0, 4, (5, 3, 9)).astype(np.float64)
    y = rng.integers(0, 4, (5, 3, 9)).astype(np.float64)
    x[0, 0] = 2.0  # a constant row -> NaN in both
    for dim in (0, 1, 2, -1):
        got_np = metrics._correlation_numpy(x, y, dim % 3)
        got_t = metrics._correlation(torch.from_numpy(x), torch.from_numpy(y), dim % 3)
        np.testing.assert_allclose(got_t.numpy(), got_np, atol=1e-12, equal_nan=True)
    assert np.isnan(metrics._correlation_numpy(x, y, 2)[0, 0])
