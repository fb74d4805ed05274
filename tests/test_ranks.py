"""rankcore.ranks against scipy.stats.rankdata, on heavily tied data, both backends."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rankcore import ranks
from rankcore.errors import InputError, ShapeError
from rankcore.ranks import get_rank, get_tiedrank, rank

FAST = settings(max_examples=50, deadline=None)
BACKENDS = ("numpy", "torch")

# Heavy ties: small integers in shapes with an asymmetric batch, 1..12 values per row.
tied_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7),
    elements=st.integers(-3, 3),
)


def _sodeep_reference(a: np.ndarray, axis: int, method: str) -> np.ndarray:
    n = a.shape[axis]
    return (n + 1 - scipy.stats.rankdata(a, method=method, axis=axis)) / n


def test_fractional_example_from_the_design():
    x = torch.tensor([1.0, 1, 2, 3, 3, 4, 5, 5, 5])
    assert rank(x).tolist() == [1.5, 1.5, 3, 4.5, 4.5, 6, 8, 8, 8]


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(a=tied_arrays, data=st.data())
def test_rank_equals_scipy_exactly(backend, a, data):
    dim = data.draw(st.integers(-a.ndim, a.ndim - 1))
    got = ranks._fractional(torch.from_numpy(a), dim, "ascending", backend)
    expected = scipy.stats.rankdata(a, method="average", axis=dim)
    assert got.dtype == torch.from_numpy(a).dtype
    np.testing.assert_array_equal(got.numpy(), expected)
    desc = ranks._fractional(torch.from_numpy(a), dim, "descending", backend)
    np.testing.assert_array_equal(desc.numpy(), scipy.stats.rankdata(-a, axis=dim))


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(a=tied_arrays, data=st.data())
def test_sodeep_conventions_match_scipy(backend, a, data):
    dim = data.draw(st.integers(-a.ndim, a.ndim - 1))
    a = a.astype(np.float64)
    tied = ranks._fractional(torch.from_numpy(a), dim, "sodeep", backend)
    np.testing.assert_allclose(tied.numpy(), _sodeep_reference(a, dim, "average"), rtol=1e-15)
    # scipy's "ordinal" ranks equal values in order of appearance, our documented tie-break
    ordinal = ranks._ordinal_sodeep(torch.from_numpy(a), dim, backend)
    np.testing.assert_allclose(ordinal.numpy(), _sodeep_reference(a, dim, "ordinal"),
                               rtol=1e-15)


def test_sodeep_examples_and_default_dim():
    assert get_tiedrank(torch.tensor([5.0, 5.0, 1.0])).tolist() == [0.5, 0.5, 1.0]
    np.testing.assert_allclose(get_rank(torch.tensor([5.0, 5.0, 1.0])).numpy(),
                               [2 / 3, 1 / 3, 1.0])
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 5.0]])  # (3, 2): default dim=0 ranks columns
    np.testing.assert_allclose(get_tiedrank(x).numpy(),
                               _sodeep_reference(x.numpy(), 0, "average"))
    assert get_rank(x).shape == (3, 2)


@FAST
@given(a=hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 12)),
                    elements=st.integers(0, 4)))
def test_batched_equals_row_by_row(a):
    t = torch.from_numpy(a)
    for fn in (rank, lambda v, dim: get_tiedrank(v, dim=dim), lambda v, dim: get_rank(v, dim=dim)):
        batched = fn(t, dim=-1)
        for i in range(a.shape[0]):
            assert torch.equal(batched[i], fn(t[i], dim=-1))


@FAST
@given(a=hnp.arrays(np.float64, st.integers(1, 20), elements=st.integers(0, 3)),
       seed=st.integers(0, 2**32 - 1))
def test_permutation_equivariance(a, seed):
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(a.size))
    t = torch.from_numpy(a)
    assert torch.equal(rank(t[perm]), rank(t)[perm])
    assert torch.equal(get_tiedrank(t[perm]), get_tiedrank(t)[perm])
    # ordinal ranks are equivariant up to the tie order: their multiset per value is
    r_perm, r = get_rank(t[perm]), get_rank(t)[perm]
    for value in np.unique(a):
        mask = t[perm] == value
        assert sorted(r_perm[mask].tolist()) == sorted(r[mask].tolist())


@FAST
@given(a=tied_arrays)
def test_rank_invariants(a):
    t = torch.from_numpy(a.astype(np.float64))
    n = a.shape[-1]
    r = rank(t)
    assert torch.allclose(r.sum(-1), torch.full(a.shape[:-1], n * (n + 1) / 2, dtype=r.dtype))
    assert torch.equal(rank(t, descending=True), (n + 1) - r)
    s = get_tiedrank(t, dim=-1)
    assert bool(((s >= 1 / n - 1e-12) & (s <= 1 + 1e-12)).all())


def test_result_is_detached_float_and_same_device():
    x = torch.randn(4, 5, requires_grad=True)
    for out in (rank(x), get_rank(x, dim=1), get_tiedrank(x, dim=1)):
        assert not out.requires_grad and out.grad_fn is None
        assert out.dtype == torch.float32 and out.device == x.device and out.shape == x.shape
    assert rank(x.double()).dtype == torch.float64
    assert rank(x.half()).dtype == torch.float32
    assert rank(torch.tensor([3, 1, 2])).dtype == torch.get_default_dtype()


def test_numpy_and_integer_input():
    out = rank(np.array([3, 1, 3]))
    assert isinstance(out, torch.Tensor) and out.tolist() == [2.5, 1.0, 2.5]
    big = torch.tensor([2**40 + 1, 2**40, 2**40 + 1])  # distinct in int64, equal in float32
    assert rank(big).tolist() == [2.5, 1.0, 2.5]
    assert rank(torch.tensor([2**40 + 1, 2**40])).tolist() == [2.0, 1.0]
    assert rank(torch.tensor([True, False, True])).tolist() == [2.5, 1.0, 2.5]


def test_non_contiguous_input_and_negative_zero():
    x = torch.tensor([[0.0, -0.0, 1.0], [2.0, 2.0, -1.0]]).t()  # (3, 2), non-contiguous
    np.testing.assert_array_equal(rank(x, dim=0).numpy(),
                                  scipy.stats.rankdata(x.numpy(), axis=0))


@pytest.mark.parametrize("fn", [rank, get_rank, get_tiedrank])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 3, 6])
def test_nonfinite_input_is_refused_naming_x(fn, dtype, bad, where):
    x = torch.arange(14, dtype=dtype).reshape(2, 7)
    x[1, where] = bad
    with pytest.raises(InputError, match="`x` must be finite"):
        fn(x, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_refused_by_both_backends(backend):
    x = torch.tensor([[1.0, 2.0, float("nan"), 0.5]])
    with pytest.raises(InputError, match="`x`"):
        ranks._fractional(x, -1, "ascending", backend)
    with pytest.raises(InputError, match="`x`"):
        ranks._ordinal_sodeep(x, -1, backend)
    with pytest.raises(ValueError):  # InputError is a ValueError
        ranks._fractional(-x, -1, "sodeep", backend)


@pytest.mark.parametrize("fn", [rank, get_rank, get_tiedrank])
def test_bad_shapes_are_refused(fn):
    with pytest.raises(ShapeError, match="0-d"):
        fn(torch.tensor(1.0))
    with pytest.raises(ShapeError, match="non-empty"):
        fn(torch.zeros(3, 0), dim=-1)
    with pytest.raises(ShapeError, match="`dim`"):
        fn(torch.zeros(3, 2), dim=2)
    with pytest.raises(InputError, match="`x` must be"):
        fn(np.array(["a", "b"]))
    with pytest.raises(InputError, match="`x` must be"):
        fn({"a": 1})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_and_stays_on_device(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (33, 17), generator=g).to(dtype)
    xc = x.to("cuda")
    for fn in (rank, lambda v: get_rank(v, dim=-1), lambda v: get_tiedrank(v, dim=-1)):
        out = fn(xc)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), fn(x), rtol=0, atol=0)
    with pytest.raises(InputError, match="`x`"):
        rank(torch.tensor([1.0, float("nan")], device="cuda"))
