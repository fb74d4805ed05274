"""How good is a rank surrogate? Rank error, Spearman with exact ranks, gradient agreement.

Issue 4 §2 measures every differentiable rank surrogate (learned sorters, the training-free
soft ranks of :mod:`rankcore.soft`, and exact ranks as the reference) on one fixed, seeded
suite (:func:`accuracy_suite`: lengths 8 … 256, every generator family of
:mod:`rankcore.sorters.sampler`, with and without ties, age-like vectors included). Every
surrogate is expressed in SoDeep's convention ``sodeep_desc_norm`` ((N + 1 − R)/N), so that

- ``rank_error``: mean |surrogate(x) − get_tiedrank(x)|, which IS the mean |rank error|/N;
- ``spearman``: Spearman's correlation between surrogate(x) and the exact ranks, per row
  (rows whose exact ranks are constant are left out; a constant surrogate output against a
  non-constant target counts as 0);
- ``grad_cosine``: gradient agreement. For targets y (a suite row) and predictions
  p = y + ν·std(y)·ε (ν = ``noise``, a regressor half-way through training), the surrogate
  loss L_s(p) = mean_i (surrogate(p)_i − get_tiedrank(y)_i)² (exactly SpearmanLoss for a
  sorter, SoftSpearmanLoss for a soft rank) is compared with the EXACT loss
  L(p) = mean_i (get_tiedrank(p)_i − get_tiedrank(y)_i)², which is piecewise constant. Its
  improvement direction is estimated by Gaussian smoothing (antithetic finite differences,
  Nesterov & Spokoiny 2017): ĝ = E[(L(p + σu) − L(p − σu)) / (2σ) · u], u ~ N(0, I), with
  σ = ``fd_scale``·std(p). The score is cos(∇L_s(p), ĝ) averaged over rows: 1 means the
  surrogate's gradient points where the exact objective improves at resolution σ; a
  surrogate whose gradient vanishes almost everywhere (an almost hard step) scores near 0.
  Exact ranks have no gradient (NaN).

The estimator's own noise caps the achievable cosine below 1 (:func:`fd_self_agreement`
measures that ceiling); compare surrogates with each other, on the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from rankcore.errors import InputError
from rankcore.ranks import get_tiedrank
from rankcore.sorters.base import Sorter
from rankcore.sorters.evalset import EvalBatch, fixed_eval_set
from rankcore.sorters.sampler import make_generator

__all__ = [
    "SUITE_LENGTHS",
    "SUITE_SEED",
    "CellScore",
    "Surrogate",
    "accuracy_suite",
    "evaluate_surrogate",
    "exact_loss",
    "exact_surrogate",
    "fd_gradient",
    "fd_self_agreement",
    "gradient_agreement",
    "rank_error",
    "rank_spearman",
    "soft_surrogate",
    "sorter_surrogate",
    "summarize",
]

#: Seed of the accuracy suite (written once; change it and every published number changes).
SUITE_SEED = 20240604
#: Lengths of the accuracy suite.
SUITE_LENGTHS = (8, 16, 32, 64, 128, 256)
#: Defaults of the gradient-agreement measure (see the module docstring).
NOISE, FD_SCALE, FD_SAMPLES, GRAD_ROWS = 0.5, 0.05, 512, 16


@dataclass(frozen=True)
class Surrogate:
    """A rank surrogate in SoDeep's convention.

    Attributes:
        name: label used in tables.
        ranks: maps values (B, N) to ranks (B, N) ≈ (N + 1 − R)/N, differentiable when
            ``differentiable``.
        seq_len: the one length it accepts (fixed-length sorters), None for any.
        differentiable: False for exact ranks (no gradient agreement is computed).
    """

    name: str
    ranks: Callable[[torch.Tensor], torch.Tensor]
    seq_len: int | None = None
    differentiable: bool = True

    def accepts(self, n: int) -> bool:
        """Whether the surrogate ranks sequences of length ``n``."""
        return self.seq_len is None or self.seq_len == n


def sorter_surrogate(sorter: Sorter, name: str | None = None) -> Surrogate:
    """A learned sorter as a surrogate (its loss is SpearmanLoss's MSE term)."""
    if not isinstance(sorter, Sorter):
        raise InputError(f"`sorter` must be a rankcore sorter, got {type(sorter).__name__}")
    label = name or (f"{sorter.kind}" + (f"@{sorter.seq_len}" if sorter.seq_len else ""))
    return Surrogate(label, sorter, sorter.seq_len, True)


def soft_surrogate(method: str, strength: float) -> Surrogate:
    """A soft rank of :mod:`rankcore.soft` as a surrogate, as SoftSpearmanLoss applies it.

    Values are standardised per row with a DETACHED mean and std (so ``strength`` is in
    standard deviations), ranked ascending on 1..N, and mapped to (N + 1 − r)/N; the MSE of
    that against ``get_tiedrank(target)`` equals SoftSpearmanLoss's rank term.
    """
    from rankcore.soft import soft_rank

    def ranks(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        mean = x.detach().mean(dim=-1, keepdim=True)
        std = x.detach().std(dim=-1, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
        r = soft_rank((x - mean) / std, dim=-1, method=method, strength=strength)
        return (n + 1 - r) / n

    soft_rank(torch.zeros(1, 2), method=method, strength=strength)  # validate the arguments
    return Surrogate(f"soft-{method}(s={strength:g})", ranks, None, True)


def exact_surrogate() -> Surrogate:
    """Exact tie-aware ranks (the reference: error 0, Spearman 1, no gradient)."""
    return Surrogate("exact", lambda x: get_tiedrank(x, dim=-1), None, False)


def rank_error(ranks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean |ranks − target| per row: the mean |rank error|/N in SoDeep's convention."""
    return (ranks.detach().double() - target.double()).abs().mean(dim=-1)


def rank_spearman(ranks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman's correlation of each row of ``ranks`` with ``target`` (fractional ranks).

    NaN where ``target`` is constant (undefined); 0 where only ``ranks`` is constant.
    """
    from rankcore.metrics import srcc

    r = srcc(ranks.detach().double(), target.double(), dim=-1)
    t_const = (target == target[..., :1]).all(dim=-1)
    return torch.where(t_const, torch.nan, torch.nan_to_num(r, nan=0.0))


def exact_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(...,) mean_i (get_tiedrank(p)_i − target_i)² along the last dim (no gradient)."""
    return (get_tiedrank(p, dim=-1) - target).square().mean(dim=-1)


def fd_gradient(p: torch.Tensor, target: torch.Tensor, *, fd_scale: float = FD_SCALE,
                samples: int = FD_SAMPLES, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Gaussian-smoothing estimate of the gradient of :func:`exact_loss` at ``p``.

    Args:
        p: (B, N) predictions, float64.
        target: (B, N) target ranks in SoDeep's convention.
        fd_scale: σ as a fraction of each row's standard deviation.
        samples: antithetic pairs per row.
        generator: CPU generator of the directions.

    Returns:
        (B, N) float64 estimate E[(L(p + σu) − L(p − σu)) / (2σ) · u].
    """
    b, n = p.shape
    p = p.detach().double()
    t = target.double().unsqueeze(1)
    sigma = fd_scale * p.std(dim=-1, unbiased=False).clamp_min(1e-300).view(b, 1, 1)
    out = torch.zeros(b, n, dtype=torch.float64)
    chunk = max(1, min(samples, 2**22 // max(1, b * n)))
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        u = torch.randn(b, k, n, generator=generator, dtype=torch.float64)
        diff = exact_loss(p.unsqueeze(1) + sigma * u, t) - exact_loss(p.unsqueeze(1) - sigma * u, t)
        out += (diff.unsqueeze(-1) * u).sum(dim=1)
    return out / (2 * sigma.view(b, 1) * samples)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    num = (a * b).sum(dim=-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def _noisy_predictions(y: torch.Tensor, noise: float, gen: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, keep): p = y + noise·std(y)·ε for rows of y that are not constant."""
    y = y.double()
    keep = ~(y == y[:, :1]).all(dim=-1)
    eps = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    p = y + noise * y.std(dim=-1, keepdim=True) * eps
    return p[keep], keep


def gradient_agreement(surrogate: Surrogate, y: torch.Tensor, *, noise: float = NOISE,
                       fd_scale: float = FD_SCALE, samples: int = FD_SAMPLES, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine between the surrogate loss's gradient and the smoothed exact-loss gradient.

    Args:
        surrogate: a differentiable surrogate that accepts y's length.
        y: (B, N) target values (constant rows are skipped).
        noise: prediction noise ν in standard deviations of y.
        fd_scale: smoothing σ in standard deviations of p.
        samples: antithetic pairs of the finite-difference estimate.
        seed: seed of the noise and of the directions.

    Returns:
        ``(cosine, grad_norm)``, each (B',) float64 for the B' non-constant rows: the cosine
        and ‖∇_p L_s‖·std(p) (the gradient's size for a unit-free step; its scale shows a
        vanishing gradient that the cosine alone hides).
    """
    if not surrogate.differentiable:
        raise InputError(f"`surrogate` {surrogate.name!r} has no gradient")
    gen = make_generator(seed, y.shape[-1], 1)
    p, keep = _noisy_predictions(y, noise, gen)
    if p.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    target = get_tiedrank(y.double()[keep], dim=-1)
    dtype, device = _param_spec(surrogate)
    pv = p.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    with torch.enable_grad():
        ranks = surrogate.ranks(pv).double()
        loss = (ranks - target.to(ranks.device)).square().mean(dim=-1).sum()
        (grad,) = torch.autograd.grad(loss, pv)
    grad = grad.detach().double().cpu()
    g_fd = fd_gradient(p, target, fd_scale=fd_scale, samples=samples, generator=gen)
    return _cosine(grad, g_fd), grad.norm(dim=-1) * p.std(dim=-1)


def fd_self_agreement(y: torch.Tensor, *, noise: float = NOISE, fd_scale: float = FD_SCALE,
                      samples: int = FD_SAMPLES, seed: int = 0) -> torch.Tensor:
    """(B',) cosine between two independent finite-difference estimates (the noise ceiling)."""
    gen = make_generator(seed, y.shape[-1], 2)
    p, keep = _noisy_predictions(y, noise, gen)
    target = get_tiedrank(y.double()[keep], dim=-1)
    a = fd_gradient(p, target, fd_scale=fd_scale, samples=samples, generator=gen)
    b = fd_gradient(p, target, fd_scale=fd_scale, samples=samples, generator=gen)
    return _cosine(a, b)


def _param_spec(surrogate: Surrogate) -> tuple[torch.dtype, torch.device]:
    """(dtype, device) the surrogate computes in: its parameters' for a module."""
    module = surrogate.ranks
    if isinstance(module, torch.nn.Module):
        first = next(module.parameters(), None)
        if first is not None:
            return first.dtype, first.device
    return torch.float64, torch.device("cpu")


#: Rows × N² budget of one surrogate call (pairwise sorters hold (rows, N, N, hidden) tensors).
_PAIR_BUDGET = 2**20


def _ranks_no_grad(surrogate: Surrogate, x: torch.Tensor) -> torch.Tensor:
    """surrogate.ranks(x) without a graph, in row chunks; (B, N) float64 on the CPU."""
    dtype, device = _param_spec(surrogate)
    n = x.shape[-1]
    step = max(1, _PAIR_BUDGET // (n * n))
    with torch.no_grad():
        parts = [surrogate.ranks(x[i:i + step].to(device=device, dtype=dtype)).double().cpu()
                 for i in range(0, x.shape[0], step)]
    return torch.cat(parts)


@dataclass(frozen=True)
class CellScore:
    """Scores of one surrogate on one suite cell (means over the cell's rows).

    Attributes:
        surrogate: the surrogate's name.
        family, seq_len, ties: the cell (see :class:`rankcore.sorters.EvalBatch`).
        rank_error: mean |rank error|/N.
        spearman: mean Spearman between surrogate and exact ranks.
        grad_cosine: mean gradient agreement (NaN when not computed or not differentiable).
        grad_norm: mean ‖∇_p L_s‖·std(p) (NaN likewise).
    """

    surrogate: str
    family: str
    seq_len: int
    ties: bool
    rank_error: float
    spearman: float
    grad_cosine: float = math.nan
    grad_norm: float = math.nan


def accuracy_suite(seq_lens: Sequence[int] = SUITE_LENGTHS, *, rows: int = 64,
                   seed: int = SUITE_SEED) -> list[EvalBatch]:
    """The fixed evaluation suite of issue 4 §2 (:func:`fixed_eval_set` at ``SUITE_SEED``)."""
    return fixed_eval_set(seed, tuple(seq_lens), rows=rows, dtype=torch.float32)


def _mean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


def evaluate_surrogate(surrogate: Surrogate, suite: Iterable[EvalBatch], *,
                       grad_rows: int = GRAD_ROWS, noise: float = NOISE,
                       fd_scale: float = FD_SCALE, fd_samples: int = FD_SAMPLES,
                       seed: int = 0) -> list[CellScore]:
    """Score ``surrogate`` on every suite cell whose length it accepts.

    Args:
        surrogate: the surrogate.
        suite: cells, e.g. :func:`accuracy_suite`.
        grad_rows: rows per cell used for gradient agreement (0 skips it).
        noise, fd_scale, fd_samples: see :func:`gradient_agreement`.
        seed: seed of the gradient-agreement noise (offset by the cell's index).

    Returns:
        One :class:`CellScore` per accepted cell, in suite order.
    """
    if isinstance(grad_rows, bool) or not isinstance(grad_rows, int) or grad_rows < 0:
        raise InputError(f"`grad_rows` must be an integer >= 0, got {grad_rows!r}")
    out = []
    for k, cell in enumerate(suite):
        if not surrogate.accepts(cell.seq_len):
            continue
        pred = _ranks_no_grad(surrogate, cell.x)
        cos = norm = math.nan
        if grad_rows and surrogate.differentiable:
            c, g = gradient_agreement(surrogate, cell.x[:grad_rows], noise=noise,
                                      fd_scale=fd_scale, samples=fd_samples, seed=seed + k)
            cos, norm = _mean(c), _mean(g)
        out.append(CellScore(surrogate.name, cell.family, cell.seq_len, cell.ties,
                             _mean(rank_error(pred, cell.target)),
                             _mean(rank_spearman(pred, cell.target)), cos, norm))
    return out


def summarize(scores: Iterable[CellScore], *, seq_len: int | None = None,
              ties: bool | None = None, families: Sequence[str] | None = None
              ) -> dict[str, float]:
    """Means over the matching cells (each cell weighs the same).

    Args:
        scores: cell scores.
        seq_len, ties, families: keep only cells with this length / tie state / family.

    Returns:
        ``{"rank_error", "spearman", "grad_cosine", "grad_norm", "cells"}`` (NaN when no cell
        matches or the metric was not computed).
    """
    chosen = [s for s in scores if (seq_len is None or s.seq_len == seq_len)
              and (ties is None or s.ties == ties)
              and (families is None or s.family in families)]
    def col(name: str) -> float:
        return _mean(torch.tensor([getattr(s, name) for s in chosen], dtype=torch.float64))
    return {"rank_error": col("rank_error"), "spearman": col("spearman"),
            "grad_cosine": col("grad_cosine"), "grad_norm": col("grad_norm"),
            "cells": float(len(chosen))}
