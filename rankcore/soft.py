"""Differentiable soft ranks that need no training: pairwise sigmoid and the PAV projection.

Both methods return ascending soft ranks on the 1..N scale of :func:`rankcore.ranks.rank`
(the smallest value gets ~1, the largest ~N), are batched over any leading shape with no Python
loop over batch rows, run on the input's device, and converge to the exact fractional ranks of
``rank`` as ``strength -> 0``; tied values share one soft rank at every strength.
``strength`` is on the scale of ``x``: ``soft_rank(a * x, strength=a * s) == soft_rank(x,
strength=s)`` for ``a > 0``, and adding a constant to ``x`` changes nothing.

``method="pairwise"``: ``r_i = 1/2 + sum_j sigmoid((x_i - x_j) / strength)``, the sum running
over all j (the j = i term is 1/2), i.e. ``1 + sum_{j != i} sigmoid(...)``. Ranks sum to
N(N+1)/2; the error against exact ranks is at most ``sum_{x_j != x_i} exp(-|x_i - x_j| /
strength)`` (ties contribute exactly 1/2 each, hence their average rank).
O(N^2) time per row; memory O(N) per row beyond one bounded work buffer (the N x N sigmoid
matrix is never stored: the forward and the exact backward are evaluated in row chunks; only a
double backward, ``create_graph=True``, builds the full (B, N, N) matrices).

``method="pav"``: the quadratically regularised soft rank of Blondel, Teboul, Berthet and
Djolonga, "Fast Differentiable Sorting and Ranking", ICML 2020 (arXiv:2002.08871), i.e. the
Euclidean projection of ``x / strength`` onto the permutahedron P(rho), the convex hull of the
permutations of rho = (N, N-1, ..., 1):

    r(x) = P_Q(x / strength, rho) = argmin_{mu in P(rho)} 1/2 ||mu - x / strength||^2.

In the paper's notation (Sec. 3, regularised projections P_Q(z, w) with Q = 1/2 ||.||^2, and
P_{eps Q}(z, w) = P_Q(z / eps, w); soft rank r_{eps Q}(theta) = P_{eps Q}(-theta, rho), which
ranks in DESCENDING order) this is r_{eps Q}(-x) with eps = strength. It is computed by the
paper's reduction to isotonic optimisation (Sec. 4.1, Prop. 3): with z = x / strength,
s = z sorted in descending order (permutation sigma) and the isotonic regression
v = argmin_{v_1 >= ... >= v_N} 1/2 ||v - (s - rho)||^2, solved by pool-adjacent-violators,
r_sigma = s - v. The Jacobian of v is block-diagonal with the averaging matrix 1 1^T / |B| on
every pooled block B (Sec. 4.3), so the exact vector-Jacobian product is
``(g - blockmean(g)) / strength`` in sorted order, mapped back through sigma.
Properties: ranks sum to N(N+1)/2 exactly; they equal the exact ranks as soon as
``strength <=`` the smallest gap between sorted values (without ties; with tie groups of
sizes a, b on either side of a gap, ``strength <= gap / ((a + b) / 2)``), so unlike pairwise
the relevant scale is the gap between NEIGHBOURING values (dense data pooled at too large a
strength gets compressed ranks); once ``strength >= 2 range(x) / N`` the whole row is one
pooled block and ``r = (N + 1) / 2 + (x - mean(x)) / strength`` exactly, so every rank tends
to (N + 1) / 2, linearly in x (soft Spearman becomes Pearson).

Cost of ``pav``: one sort, O(N log N), plus the isotonic regression. On CPU the whole batch
is solved by ONE call of scipy's C++ PAV (``scipy.optimize.isotonic_regression``, O(N) per row):
the rows are concatenated with offsets that keep every row's values above the next row's, so
no pooled block can span two rows and the joint solution is the row-wise one. On other devices
(CUDA) a torch-only PAV merges every adjacent violating pair of blocks of every row at once
per round (a valid PAV step, since the result does not depend on the merge order): O(N) work
per round and R rounds, with R data-dependent (measured 2-40 for N <= 4096 on normal and
integer-age data; worst case N - 1, e.g. a long evenly spaced run next to a large tie
clump). Without scipy >= 1.12 the CPU uses that torch path too. The isotonic step runs in
float64 whatever the input dtype; absolute error about 1e-16 * (range(x) / strength + N).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from rankcore._validate import (
    as_tensor,
    check_choice,
    check_finite,
    check_positive,
    check_ranked_dim,
)

__all__ = ["SOFT_RANK_METHODS", "soft_rank"]

SOFT_RANK_METHODS = ("pav", "pairwise")

# Elements of the (rows, chunk, N) work buffer of the pairwise method, which bounds its memory
# whatever the batch size and N: 2**20 on CPU (8 MiB in float64, cache-friendly), 64 times
# that on accelerators, where fewer, larger kernels pay off.
_PAIRWISE_CHUNK_ELEMENTS = 2**20
_ACCELERATOR_CHUNK_FACTOR = 64


def soft_rank(
    x: Any, dim: int = -1, method: str = "pav", strength: float = 1.0
) -> torch.Tensor:
    """Differentiable ascending soft ranks on the 1..N scale, along ``dim``.

    Args:
        x: Values to rank, a tensor (or numpy array) of any shape (..., N, ...); must be finite.
            Every dimension other than ``dim`` is a batch dimension.
        dim: The dimension to rank along.
        method: ``"pav"`` (projection onto the permutahedron, Blondel et al. 2020; O(N log N)
            on CPU) or ``"pairwise"`` (sum of sigmoids of pairwise differences; O(N^2)).
            See the module docstring for the exact formulas.
        strength: Regularisation strength (> 0), in the units of ``x``: how far apart two
            values must be to get clearly different ranks. ``strength -> 0`` gives the exact
            fractional ranks of :func:`rankcore.ranks.rank`; a large strength pulls every rank
            towards (N + 1) / 2.

    Returns:
        A tensor of the shape and device of ``x`` with soft ranks in [1, N], differentiable
        with respect to ``x``: ``x``'s dtype for float32/float64, float32 for half precision,
        the default float dtype for integer input. Tied values always share one soft rank.

    Raises:
        InputError: ``method`` is unknown, ``strength`` is not a positive number, ``x`` holds
            NaN or inf or is not numeric.
        ShapeError: ``x`` is 0-d or empty, or ``dim`` is out of range.

    Example:
        >>> soft_rank(torch.tensor([5.0, 1.0, 2.0]), strength=2.0).tolist()
        [3.0, 1.25, 1.75]
    """
    check_choice(method, "method", SOFT_RANK_METHODS)
    eps = check_positive(strength, "strength")
    x = as_tensor(x, "x")
    dim = check_ranked_dim(x, "x", dim)
    check_finite(x.detach(), "x")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if method == "pairwise":
        out = _PairwiseSoftRank.apply(rows, eps)
    else:
        out = _PavSoftRank.apply(rows, eps, _default_backend(rows.device))
    return out.reshape(moved.shape).movedim(-1, dim)


# --------------------------------------------------------------------------- pairwise


def _scaled_differences(x: torch.Tensor, tau: float):
    """Yield ``(sl, D)`` with ``D = (x[:, sl, None] - x[:, None, :]) / tau`` of shape
    (B, chunk, N), chunk sized so that D holds about ``_PAIRWISE_CHUNK_ELEMENTS`` values.

    Every D is a view of ONE work buffer, overwritten by the next chunk (no autograd graph).
    """
    n_rows, n = x.shape
    budget = _PAIRWISE_CHUNK_ELEMENTS * (1 if x.device.type == "cpu" else _ACCELERATOR_CHUNK_FACTOR)
    step = min(n, max(1, budget // (n_rows * n)))
    buf = torch.empty(n_rows * step * n, dtype=x.dtype, device=x.device)
    for a in range(0, n, step):
        sl = slice(a, min(a + step, n))
        d = buf[: n_rows * (sl.stop - a) * n].view(n_rows, sl.stop - a, n)
        torch.sub(x[:, sl, None], x[:, None, :], out=d)
        yield sl, d.div_(tau)


class _PairwiseSoftRank(torch.autograd.Function):
    """r_i = 1/2 + sum_j sigmoid((x_i - x_j) / tau) for x of shape (B, N), in row chunks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.tau = tau
        out = torch.empty_like(x)
        for sl, d in _scaled_differences(x.detach(), tau):
            torch.sum(d.sigmoid_(), dim=-1, out=out[:, sl])
        return out.add_(0.5)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # d r_i / d x_k = (delta_ik sum_j s'(d_ij) - s'(d_ik)) / tau with s' = s (1 - s) even,
        # so grad_k = (g_k sum_j W_kj - sum_j W_kj g_j) / tau with W_kj = s'((x_k - x_j) / tau).
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops that a double backward traces
            s = torch.sigmoid((x[:, :, None] - x[:, None, :]) / ctx.tau)
            w = s * (1 - s)
            return (g * w.sum(dim=-1) - (w * g[:, None, :]).sum(dim=-1)) / ctx.tau, None
        grad = torch.empty_like(g)
        for sl, d in _scaled_differences(x.detach(), ctx.tau):
            w = d.sigmoid_()
            w.addcmul_(w, w, value=-1.0)  # s - s^2, in the work buffer
            w_sum = w.sum(dim=-1)
            grad[:, sl] = g[:, sl] * w_sum - w.mul_(g[:, None, :]).sum(dim=-1)
        return grad.div_(ctx.tau), None


# --------------------------------------------------------------------------- pav


@functools.cache
def _scipy_isotonic():
    """scipy's C++ PAV (scipy >= 1.12), or None; imported lazily to keep imports fast."""
    try:
        from scipy.optimize import isotonic_regression
    except ImportError:  # pragma: no cover - scipy < 1.12
        return None
    return isotonic_regression


def _default_backend(device: torch.device) -> str:
    """``"scipy"`` for CPU tensors when scipy has a PAV, else the torch-only ``"torch"``."""
    return "scipy" if device.type == "cpu" and _scipy_isotonic() is not None else "torch"


def _isotonic_decreasing_scipy(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled blocks of the non-increasing isotonic regression of every row of y (B, N).

    Returns ``(block_id, counts)``: ``block_id`` (B * N,) int64 numbers the blocks of all rows
    consecutively in row-major order, ``counts`` (n_blocks,) float64 their sizes. One scipy call
    for the whole batch: row b is shifted into [-b (R + 1) - R, -b (R + 1)] with R the largest
    row range, so every row lies above the next and no violation can cross a row boundary.
    """
    yn = y.detach().cpu().numpy()
    n_rows = yn.shape[0]
    row_max = yn.max(axis=1, keepdims=True)
    spread = float((row_max - yn.min(axis=1, keepdims=True)).max()) + 1.0
    shift = -(np.arange(n_rows, dtype=np.float64)[:, None] * spread) - row_max
    res = _scipy_isotonic()((yn + shift).ravel(), increasing=False)
    sizes = np.diff(res.blocks)
    block_id = np.repeat(np.arange(sizes.size), sizes)
    return (torch.from_numpy(block_id).to(y.device),
            torch.from_numpy(sizes.astype(np.float64)).to(y.device))


def _isotonic_decreasing_torch(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`_isotonic_decreasing_scipy`, with torch ops on y's device.

    Parallel PAV: each round computes every block's mean and merges every block with its left
    neighbour when the neighbour's mean is smaller (a violation of v_1 >= ... >= v_N); merging a
    run of successive violators at once is a sequence of valid PAV steps. Stops when a round
    finds no violation (one device sync per round).
    """
    n_rows, n = y.shape
    flat = y.reshape(-1)
    size = flat.numel()
    starts = torch.ones(size, dtype=torch.bool, device=y.device)
    inner = torch.ones(n_rows, n, dtype=torch.bool, device=y.device)
    inner[:, 0] = False  # a row's first position always starts a block
    inner = inner.reshape(-1)
    ones = torch.ones_like(flat)
    while True:
        block_id = starts.cumsum(0) - 1
        sums = torch.zeros_like(flat).index_add_(0, block_id, flat)
        counts = torch.zeros_like(flat).index_add_(0, block_id, ones)
        mean = (sums / counts.clamp_min(1.0))[block_id]
        violation = starts & inner & (mean.roll(1) < mean)
        if not bool(violation.any()):
            n_blocks = int(block_id[-1]) + 1
            return block_id, counts[:n_blocks]
        starts &= ~violation


_ISOTONIC_BACKENDS = {"scipy": _isotonic_decreasing_scipy, "torch": _isotonic_decreasing_torch}


class _PavSoftRank(torch.autograd.Function):
    """P_Q(x / eps, rho) for x of shape (B, N) (Blondel et al. 2020), exact backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
        n_rows, n = x.shape
        z = x.detach().to(torch.float64)
        # Centring changes nothing (P(rho) lies in a hyperplane normal to 1) but keeps the
        # float64 values small, hence precise.
        z = (z - z.mean(dim=1, keepdim=True)) / eps
        s, order = torch.sort(z, dim=1, descending=True, stable=True)
        rho = torch.arange(n, 0, -1, dtype=torch.float64, device=x.device)
        y = s - rho
        block_id, counts = _ISOTONIC_BACKENDS[backend](y)
        v = torch.zeros_like(counts).index_add_(0, block_id, y.reshape(-1)) / counts
        r_sorted = s - v[block_id].view(n_rows, n)
        ctx.save_for_backward(order, block_id, counts)
        ctx.eps = eps
        return torch.empty_like(r_sorted).scatter_(1, order, r_sorted).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        order, block_id, counts = ctx.saved_tensors
        g_sorted = g.gather(1, order).reshape(-1)
        block_sum = torch.zeros(counts.shape, dtype=g.dtype, device=g.device)
        block_mean = block_sum.index_add(0, block_id, g_sorted) / counts.to(g.dtype)
        grad_sorted = (g_sorted - block_mean[block_id]).view(g.shape)
        grad = torch.empty_like(grad_sorted).scatter(1, order, grad_sorted)
        return grad / ctx.eps, None, None
