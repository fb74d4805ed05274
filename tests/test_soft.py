"""rankcore.soft: soft ranks against exact ranks, the projection's optimality conditions,
invariants (batching, permutations, sums, monotonicity, limits), exact gradients, devices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from scipy.stats import rankdata

from rankcore import soft
from rankcore.errors import InputError, ShapeError
from rankcore.ranks import rank
from rankcore.soft import SOFT_RANK_METHODS, soft_rank

SETTINGS = settings(max_examples=50, deadline=None)
BACKENDS = ("scipy", "torch")

# Values on a 1e-3 grid: plenty of exact ties, no subnormal gaps.
_grid_values = st.integers(-100_000, 100_000).map(lambda k: k / 1000)
_tied_values = st.integers(-4, 4).map(float)
vectors = st.one_of(
    st.lists(_tied_values, min_size=1, max_size=25),
    st.lists(_grid_values, min_size=1, max_size=25),
)
strengths = st.sampled_from([1e-3, 0.05, 0.3, 1.0, 4.0, 100.0])
methods = st.sampled_from(SOFT_RANK_METHODS)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _min_gap(x: np.ndarray) -> float:
    gaps = np.diff(np.unique(x))
    return float(gaps.min()) if gaps.size else 1.0


def _pav(x: torch.Tensor, strength: float, backend: str) -> torch.Tensor:
    """PAV soft ranks of a (B, N) tensor through one named isotonic backend."""
    return soft._PavSoftRank.apply(x, strength, backend)


def _pairwise_reference(x: np.ndarray, tau: float) -> np.ndarray:
    """The pairwise formula written out directly (full N x N matrix, float64)."""
    return 0.5 + expit((x[:, None] - x[None, :]) / tau).sum(axis=1)


def _assert_is_permutahedron_projection(z: np.ndarray, mu: np.ndarray, tol: float) -> None:
    """Certificate that mu = argmin_{m in P(rho)} ||m - z||, rho = (N, ..., 1).

    Feasibility: mu is majorised by rho (descending partial sums <= those of rho, equal
    totals). Optimality: <z - mu, nu - mu> <= 0 for every vertex nu (a permutation of 1..N);
    by the rearrangement inequality the largest <z - mu, nu> pairs sorted z - mu with 1..N.
    """
    n = mu.size
    rho = np.arange(n, 0, -1, dtype=np.float64)
    partial_mu = np.cumsum(np.sort(mu)[::-1])
    partial_rho = np.cumsum(rho)
    assert np.all(partial_mu <= partial_rho + tol)
    assert abs(partial_mu[-1] - partial_rho[-1]) <= tol
    c = z - mu
    best_vertex = float(np.sort(c) @ np.arange(1, n + 1))
    assert best_vertex <= float(c @ mu) + tol * max(1.0, float(np.abs(c).sum()))


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
def test_pav_matches_worked_example(backend):
    # Worked by hand: strength 2 -> z = (2.5, .5, 1), y = s - rho = (-.5, -1, -.5) pools its
    # last two entries to -.75, so r_sorted = s - v = (3, 1.75, 1.25).
    x = _t([[5.0, 1.0, 2.0], [2.0, 1.0, 5.0]])
    torch.testing.assert_close(_pav(x, 2.0, backend),
                               _t([[3.0, 1.25, 1.75], [1.75, 1.25, 3.0]]))
    torch.testing.assert_close(_pav(x, 1.0, backend), _t([[3.0, 1.0, 2.0], [2.0, 1.0, 3.0]]))


@SETTINGS
@given(x=vectors, strength=strengths)
def test_pav_is_the_projection_onto_the_permutahedron(x, strength):
    xs = np.asarray(x)
    mu = soft_rank(_t(x), method="pav", strength=strength).numpy()
    z = xs / strength
    _assert_is_permutahedron_projection(z - z.mean(), mu, tol=1e-7 * (1 + np.abs(z).max()))


@SETTINGS
@given(x=vectors, strength=strengths)
def test_pav_backends_agree(x, strength):
    xt = _t(x)[None]
    torch.testing.assert_close(_pav(xt, strength, "torch"), _pav(xt, strength, "scipy"))


def test_pav_torch_backend_on_a_many_round_input():
    # An evenly spaced run next to a large tie clump: the clump's block absorbs its left
    # neighbours one per round (the worst case of the parallel PAV).
    x = torch.cat([torch.arange(60, dtype=torch.float64) * 1.5 + 1, torch.zeros(60)])[None]
    torch.testing.assert_close(_pav(x, 1.0, "torch"), _pav(x, 1.0, "scipy"))


@SETTINGS
@given(x=vectors, strength=strengths)
def test_pairwise_matches_formula(x, strength):
    got = soft_rank(_t(x), method="pairwise", strength=strength).numpy()
    np.testing.assert_allclose(got, _pairwise_reference(np.asarray(x), strength), atol=1e-10)


@pytest.mark.parametrize("chunk_elements", [40, 255])  # chunks of 1 row; of 5 rows + 2
def test_pairwise_chunking_changes_nothing(monkeypatch, chunk_elements):
    x = torch.randn(3, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    g = torch.randn(3, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = soft_rank(x, method="pairwise", strength=0.4)
    (grad_whole,) = torch.autograd.grad(whole, x, g)
    monkeypatch.setattr(soft, "_PAIRWISE_CHUNK_ELEMENTS", chunk_elements)
    chunked = soft_rank(x, method="pairwise", strength=0.4)
    (grad_chunked,) = torch.autograd.grad(chunked, x, g)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)


@SETTINGS
@given(x=vectors, method=methods)
def test_converges_to_exact_fractional_ranks(x, method):
    xs = np.asarray(x)
    n, gap = xs.size, _min_gap(xs)
    # pav is exact once strength <= gap / ((a + b) / 2) for tie groups a, b (a + b <= N);
    # pairwise is within N exp(-gap / strength) and gives ties exactly 1/2 each.
    strength = gap / n if method == "pav" else gap / 60
    got = soft_rank(_t(x), method=method, strength=strength)
    np.testing.assert_allclose(got.numpy(), rankdata(xs, method="average"), atol=1e-6)
    torch.testing.assert_close(got, rank(_t(x)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
def test_error_shrinks_as_strength_shrinks(method):
    x = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = rank(x)
    tiny = _min_gap(x.numpy()) / 60
    errors = [float((soft_rank(x, method=method, strength=s) - exact).abs().max())
              for s in (1.0, 1e-1, 1e-2, 1e-3, tiny)]
    assert errors[0] > 1.0
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-6


# ------------------------------------------------------------------------- invariants


@st.composite
def batches(draw):
    """(B, N) arrays whose rows live on very different scales (and may repeat)."""
    n_rows = draw(st.integers(1, 5))
    n = draw(st.integers(1, 12))
    rows = [draw(st.lists(_tied_values | _grid_values, min_size=n, max_size=n))
            for _ in range(n_rows)]
    scales = draw(st.lists(st.sampled_from([1e-3, 1.0, 1e3]), min_size=n_rows,
                           max_size=n_rows))
    return np.asarray(rows) * np.asarray(scales)[:, None]


@SETTINGS
@given(x=batches(), method=methods, strength=strengths)
def test_batched_equals_row_by_row(x, method, strength):
    xt = _t(x)
    batched = soft_rank(xt, method=method, strength=strength)
    looped = torch.stack([soft_rank(row, method=method, strength=strength) for row in xt])
    torch.testing.assert_close(batched, looped)
    if method == "pav":
        torch.testing.assert_close(_pav(xt, strength, "torch"), looped)


@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_any_dim_and_leading_shape(method, dim):
    x = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = soft_rank(x, dim=dim, method=method, strength=0.5)
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    want = torch.stack([soft_rank(r, method=method, strength=0.5) for r in rows])
    assert got.shape == x.shape
    torch.testing.assert_close(got, want.reshape(moved.shape).movedim(-1, dim))


@SETTINGS
@given(x=vectors, method=methods, strength=strengths, data=st.data())
def test_permutation_equivariance(x, method, strength, data):
    perm = data.draw(st.permutations(range(len(x))))
    xt = _t(x)
    r = soft_rank(xt, method=method, strength=strength)
    torch.testing.assert_close(soft_rank(xt[list(perm)], method=method, strength=strength),
                               r[list(perm)])


@SETTINGS
@given(x=vectors, method=methods, strength=strengths)
def test_ranks_sum_to_n_n_plus_1_over_2(x, method, strength):
    n = len(x)
    total = float(soft_rank(_t(x), method=method, strength=strength).sum())
    assert total == pytest.approx(n * (n + 1) / 2, abs=1e-8 * n * n)


@SETTINGS
@given(x=vectors, method=methods, strength=strengths)
def test_monotone_and_ties_shared(x, method, strength):
    xs = np.asarray(x)
    r = soft_rank(_t(x), method=method, strength=strength).numpy()
    greater = xs[:, None] > xs[None, :]
    assert np.all(r[:, None][greater.nonzero()[0], 0] >= r[greater.nonzero()[1]] - 1e-9)
    equal = xs[:, None] == xs[None, :]
    np.testing.assert_allclose(r[equal.nonzero()[0]], r[equal.nonzero()[1]], atol=1e-9)
    assert np.all((r >= 1 - 1e-9) & (r <= len(x) + 1e-9))


@SETTINGS
@given(x=vectors, method=methods, shift=st.floats(-50, 50), scale=st.sampled_from([0.5, 8.0]))
def test_shift_and_scale_invariance(x, method, shift, scale):
    xt = _t(x)
    r = soft_rank(xt, method=method, strength=0.7)
    torch.testing.assert_close(soft_rank(xt + shift, method=method, strength=0.7), r)
    torch.testing.assert_close(soft_rank(xt * scale, method=method, strength=0.7 * scale), r)


@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
def test_precise_far_from_zero(method):
    # A large common offset must not cost precision (the PAV step runs in float64 on centred
    # values). Dyadic values, so x + 2**30 is exact in float64.
    x = torch.tensor([0.0, 0.375, 0.5, 1.25, 1.3125, 1.375, 2.0], dtype=torch.float64)
    near = soft_rank(x, method=method, strength=0.1)
    assert not torch.allclose(near, rank(x))  # some values are pooled
    torch.testing.assert_close(soft_rank(x + 2.0**30, method=method, strength=0.1), near,
                               atol=1e-9, rtol=0)


@SETTINGS
@given(x=vectors)
def test_pav_large_strength_limit(x):
    xt = _t(x)
    n = len(x)
    centre = (n + 1) / 2
    # From strength >= 2 range / N on the whole row is one block: r = centre + (x - mean) / s.
    s = 2 * (float(xt.max() - xt.min()) + 1e-3) / n
    torch.testing.assert_close(soft_rank(xt, strength=s), centre + (xt - xt.mean()) / s)
    r = soft_rank(xt, strength=1e9)
    torch.testing.assert_close(r, torch.full_like(r, centre), atol=1e-6, rtol=0)


def test_pairwise_large_strength_limit():
    x = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    r = soft_rank(x, method="pairwise", strength=1e9)
    torch.testing.assert_close(r, torch.full_like(r, 5.0), atol=1e-7, rtol=0)


# -------------------------------------------------------------------------- gradients


def _separated(n: int, seed: int) -> torch.Tensor:
    """Values without near-ties, so the PAV blocks are stable under gradcheck's steps."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(n, generator=g).double() * 0.37
            + 0.05 * torch.rand(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pav_gradcheck(backend):
    x = torch.stack([_separated(9, 0), _separated(9, 1), _separated(9, 2)]).requires_grad_()
    strength = 0.6  # gaps of ~0.37 < strength: several pooled blocks, not one
    r = _pav(x.detach(), strength, backend)
    assert not torch.allclose(r, rank(x.detach()))
    assert not torch.allclose(r, torch.full_like(r, 5.0), atol=0.5)
    assert torch.autograd.gradcheck(lambda t: _pav(t, strength, backend), (x,))


def test_pav_gradcheck_through_soft_rank_with_dim():
    x = torch.stack([_separated(4, k) for k in range(6)]).reshape(2, 3, 4).transpose(1, 2)
    x = x.contiguous().requires_grad_()  # ranked along dim=1 (length 4)
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, dim=1, strength=0.5), (x,))


def test_pairwise_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x.requires_grad_()
    fn = lambda t: soft_rank(t, method="pairwise", strength=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
def test_jacobian_is_symmetric_with_zero_row_sums(method):
    # Both maps are gradients of convex potentials (symmetric Jacobian) and shift-invariant.
    x = _separated(8, 7)
    jac = torch.autograd.functional.jacobian(
        lambda t: soft_rank(t, method=method, strength=0.6), x)
    torch.testing.assert_close(jac, jac.T)
    torch.testing.assert_close(jac.sum(dim=1), torch.zeros(8, dtype=torch.float64))
    assert float(jac.abs().max()) > 0.1


# ------------------------------------------------------------------ dtypes and errors


@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved_and_differentiable(method, dtype):
    x = torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=dtype, requires_grad=True)
    r = soft_rank(x, method=method, strength=0.01)
    assert r.dtype == dtype and r.device == x.device
    torch.testing.assert_close(r.detach(), torch.tensor([4.0, 1.0, 2.5, 2.5], dtype=dtype))
    r.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


def test_other_input_types():
    assert soft_rank(np.array([2.0, 1.0])).dtype == torch.float64
    assert soft_rank(torch.tensor([2, 1])).dtype == torch.get_default_dtype()
    half = soft_rank(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float16), strength=0.01)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor([2.0, 1.0, 3.0]))
    torch.testing.assert_close(soft_rank(torch.tensor([7.0])), torch.tensor([1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
def test_non_finite_input_names_x(bad, method):
    with pytest.raises(InputError, match="`x` must be finite"):
        soft_rank(torch.tensor([1.0, bad, 2.0]), method=method)


@pytest.mark.parametrize("strength", [0, -1.0, float("nan"), float("inf"), "strong", None])
def test_strength_must_be_positive(strength):
    with pytest.raises(InputError, match="`strength` must be a positive number"):
        soft_rank(torch.tensor([1.0, 2.0]), strength=strength)


def test_unknown_method_lists_choices():
    with pytest.raises(InputError, match="`method` must be one of 'pav', 'pairwise'"):
        soft_rank(torch.tensor([1.0, 2.0]), method="sinkhorn")


@pytest.mark.parametrize("x", [torch.tensor(3.0), torch.zeros(0), torch.zeros(4, 0)])
def test_empty_or_scalar_input_is_a_shape_error(x):
    with pytest.raises(ShapeError):
        soft_rank(x)


def test_dim_out_of_range_is_a_shape_error():
    with pytest.raises(ShapeError, match="`dim`"):
        soft_rank(torch.zeros(2, 3), dim=2)


# ------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("method", SOFT_RANK_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(method, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randint(20, 80, (16, 40), generator=g).to(dtype) + 0.1 * torch.rand(16, 40,
                                                                                   generator=g)
    w = torch.randn(16, 40, generator=g, dtype=dtype)
    outs = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        r = soft_rank(xd, method=method, strength=0.3)
        assert r.device == xd.device and r.dtype == dtype
        (grad,) = torch.autograd.grad((r * w.to(device)).sum(), xd)
        outs.append((r.detach().cpu(), grad.cpu()))
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], **tol)


@pytest.mark.gpu
def test_cuda_pav_uses_the_torch_backend_and_converges():
    assert soft._default_backend(torch.device("cuda")) == "torch"
    x = torch.tensor([[3.0, 1.0, 1.0, 7.0, 5.0]], device="cuda", dtype=torch.float64)
    torch.testing.assert_close(soft_rank(x, strength=1e-3).cpu(),
                               torch.tensor([[3.0, 1.5, 1.5, 5.0, 4.0]], dtype=torch.float64))
