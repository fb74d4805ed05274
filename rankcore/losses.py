"""Ranking losses for brain-age regression (Cheng et al., IEEE TMI 2021; SoDeep, CVPR 2019).

Shapes: ``pred`` and ``target`` have the same shape (..., N); each row along the last dim is
one sequence of N ages (years) ranked on its own, and the leading dims are a batch of such
sequences. A mini-batch of B ages ranked as one sequence is therefore a (B,) tensor. Shapes
are never broadcast: a (B, 1) prediction against a (B,) target is refused with ShapeError
(squeeze the model output first), and so is a last dim of length 1, which has nothing to rank.

The differentiable losses validate shapes and dtypes but do not scan ``pred`` for NaN (that
would cost a device sync per step); a NaN prediction gives a NaN loss, which the training
loop catches. Targets are ranked exactly, which checks them (NaN or inf -> InputError).

Formulas (e = pred − target, N per sequence, ranks R ascending and fractional):

* age-difference loss, TMI 2021 eq. (5): Ld = (1/Np) Σ_{i<j} ((ŷi − ŷj) − (yi − yj))² over
  the Np = N(N − 1)/2 unordered pairs. Since Σ_{i<j} (ei − ej)² = N Σ_i (ei − ē)²,
  Ld = 2·var(e) with the unbiased variance: O(N) instead of O(N²).
* ranking loss, eq. (8): Lr = Σ_i (R(ŷi) − R(yi))² = N(N² − 1)/6 · (1 − rr) without ties.
* Spearman surrogate (SoDeep): MSE(sorter(ŷ), (N + 1 − R(y))/N) + λ_L1 · L1(ŷ, y).
* objective (:class:`BrainAgeLoss`): regression + w_rank · S + w_diff · Ld, weights independent.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankcore._validate import as_tensor, check_choice, check_positive, check_same_shape
from rankcore.errors import InputError, ShapeError, SorterLengthError
from rankcore.ranks import get_tiedrank, rank

__all__ = [
    "BrainAgeLoss",
    "SoftSpearmanLoss",
    "SpearmanLoss",
    "age_difference_loss",
    "rank_loss",
]

_REDUCTIONS = ("mean", "none")


def _check_pair(pred: Any, target: Any, *, min_len: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (pred, target) as same-shape floating tensors (..., N) with N >= ``min_len``."""
    for name, value in (("pred", pred), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"`{name}` must be a tensor, got {type(value).__name__}")
    pred = as_tensor(pred, "pred")
    target = as_tensor(target, "target")
    check_same_shape(pred, target, "pred", "target")
    if pred.ndim == 0:
        raise ShapeError("`pred` must have shape (..., N), got a 0-d tensor")
    if pred.device != target.device:
        raise InputError(f"`pred` and `target` must be on the same device, got {pred.device} "
                         f"and {target.device}")
    n = pred.shape[-1]
    if n < min_len or pred.numel() == 0:
        raise ShapeError(
            f"`pred` must hold at least {min_len} values along its last dim (one sequence per "
            f"row), got shape {tuple(pred.shape)}; to rank a mini-batch of shape (B, 1) as one "
            f"sequence, pass pred.squeeze(-1) and target of shape (B,)")
    return pred, target.to(pred.dtype)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    check_choice(reduction, "reduction", _REDUCTIONS)
    return per_row.mean() if reduction == "mean" else per_row


def age_difference_loss(pred: torch.Tensor, target: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """Age-difference loss Ld over all unordered pairs of each sequence, in O(N).

    Ld = (1/Np) Σ_{i<j} ((ŷi − ŷj) − (yi − yj))² (Cheng et al., TMI 2021, eq. 5, taken over
    every pair instead of B random ones), computed as 2·var(e) with e = ŷ − y and the unbiased
    variance; see the module docstring for the identity. Units: years².

    Args:
        pred: Predicted ages (..., N), N >= 2.
        target: True ages, same shape.
        reduction: ``"mean"`` averages over the leading (batch) dims; ``"none"`` returns them.

    Returns:
        A scalar (``"mean"``) or a (...) tensor (``"none"``), differentiable w.r.t. both inputs.

    Raises:
        InputError: non-tensor input, different devices, or unknown ``reduction``.
        ShapeError: different shapes, 0-d input, or N < 2.
    """
    pred, target = _check_pair(pred, target)
    return _reduce(2.0 * (pred - target).var(dim=-1, correction=1), reduction)


def rank_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Ranking loss Lr = Σ_i (R(ŷi) − R(yi))² with exact fractional ranks (TMI 2021, eq. 8).

    Without ties Lr = N(N² − 1)/6 · (1 − rr), rr being Spearman's correlation. Not
    differentiable (exact ranks are piecewise constant): use it to monitor training, and
    :class:`SpearmanLoss` or :class:`SoftSpearmanLoss` to train.

    Args:
        pred: Predicted ages (..., N), N >= 2; must be finite.
        target: True ages, same shape; must be finite.
        reduction: ``"mean"`` averages over the leading (batch) dims; ``"none"`` returns them.

    Returns:
        A detached scalar or (...) tensor, in squared rank units.

    Raises:
        InputError: non-tensor input, NaN or inf, different devices, or unknown ``reduction``.
        ShapeError: different shapes, 0-d input, or N < 2.
    """
    pred, target = _check_pair(pred, target)
    diff = rank(pred, dim=-1) - rank(target, dim=-1)
    return _reduce(diff.square().sum(dim=-1), reduction)


class SpearmanLoss(nn.Module):
    """SoDeep's Spearman surrogate: MSE between a learned sorter's output and the true ranks.

    loss = MSE(sorter(pred), get_tiedrank(target)) + l1_weight · L1(pred, target), where
    ``get_tiedrank`` is the tie-aware normalised descending rank (N + 1 − R)/N, the sorter's own
    convention (Engilberge et al., CVPR 2019). The sorter is called on a (B, N) batch: a (N,)
    input is one sequence, (..., N) inputs are flattened to rows and reshaped back. SoDeep's
    authors advise a positive ``l1_weight`` early in training so predictions start in range.

    The sorter is a fixed surrogate: this module keeps it in eval mode (dropout and batch norm
    off) even when the loss is put in train mode. It does not freeze its parameters; give the
    optimiser only the regressor's parameters, or call ``sorter.requires_grad_(False)``.

    Args:
        sorter: An ``nn.Module`` mapping (B, N) scores to (B, N) ranks, with attributes
            ``seq_len`` (int, or None for any length) and ``kind`` (str).
        l1_weight: Weight (>= 0) of the L1 term between predictions and targets, in years.

    Raises:
        InputError: ``sorter`` is not an nn.Module or ``l1_weight`` is negative.
    """

    def __init__(self, sorter: nn.Module, l1_weight: float = 0.0):
        super().__init__()
        if not isinstance(sorter, nn.Module):
            raise InputError(f"`sorter` must be a torch.nn.Module, got {type(sorter).__name__}")
        seq_len = getattr(sorter, "seq_len", None)
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                    or seq_len < 1):
            raise InputError(f"`sorter.seq_len` must be a positive int or None, got {seq_len!r}")
        self.sorter = sorter.eval()
        self.l1_weight = _check_weight(l1_weight, "l1_weight")

    def train(self, mode: bool = True) -> SpearmanLoss:
        super().train(mode)
        self.sorter.eval()
        return self

    def extra_repr(self) -> str:
        return f"l1_weight={self.l1_weight}"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of predicted ages ``pred`` (..., N) against true ages ``target`` (same shape).

        Returns:
            A scalar tensor, differentiable w.r.t. ``pred`` (through the sorter and the L1 term).

        Raises:
            ShapeError: shapes differ (no broadcasting), pred is 0-d, or N < 2.
            SorterLengthError: the sorter was trained for another sequence length.
            InputError: non-tensor input, or NaN/inf in ``target``.
        """
        pred, target = _check_pair(pred, target)
        n = pred.shape[-1]
        seq_len = getattr(self.sorter, "seq_len", None)
        if seq_len is not None and n != seq_len:
            raise SorterLengthError(
                f"sorter {getattr(self.sorter, 'kind', type(self.sorter).__name__)!r} accepts "
                f"sequences of length {seq_len} only, got length {n} (pred shape "
                f"{tuple(pred.shape)}); rank mini-batches of {seq_len} or use a "
                f"length-agnostic sorter")
        predicted = self.sorter(pred.reshape(-1, n))
        if predicted.shape != (pred.numel() // n, n):
            raise ShapeError(f"`sorter` must map (B, N) to (B, N), got {tuple(predicted.shape)} "
                             f"for input {(pred.numel() // n, n)}")
        wanted = get_tiedrank(target, dim=-1).reshape(-1, n).to(predicted.dtype)
        loss = F.mse_loss(predicted, wanted)
        if self.l1_weight > 0:
            loss = loss + self.l1_weight * F.l1_loss(pred, target)
        return loss


class SoftSpearmanLoss(nn.Module):
    """The Spearman objective of :class:`SpearmanLoss` through training-free soft ranks.

    loss = MSE(soft_rank(z) / N, rank(target) / N) + l1_weight · L1(pred, target), with
    ``soft_rank`` from :mod:`rankcore.soft` (ascending, 1..N scale) and exact fractional target
    ranks. Both sides are divided by N, so the value is on the scale of SpearmanLoss (whose
    descending normalised ranks differ from these only by a sign, which the square removes).

    Scale-free by construction: ``z = (pred − mean) / std`` per sequence, with mean and std
    DETACHED (treated as constants in the backward pass), so ``strength`` is in units of the
    batch's standard deviation whether ages are in years or months, and the gradient is the
    soft-rank gradient rescaled by 1/std. A constant sequence (std 0) is left unscaled.

    Args:
        method: ``"pav"`` (Blondel et al. 2020 projection, O(N log N)) or ``"pairwise"``
            (sum of pairwise sigmoids, O(N²)); see :func:`rankcore.soft.soft_rank`.
        strength: Soft-rank regularisation (> 0) in standard deviations; smaller is closer to
            exact ranks and gives sparser gradients.
        l1_weight: Weight (>= 0) of the L1 term between predictions and targets, in years.

    Raises:
        InputError: unknown ``method``, non-positive ``strength`` or negative ``l1_weight``.
    """

    def __init__(self, method: str = "pav", strength: float = 1.0, l1_weight: float = 0.0):
        super().__init__()
        soft = importlib.import_module("rankcore.soft")  # lazily: soft ranks are optional here
        self._soft_rank = soft.soft_rank
        self.method = check_choice(method, "method", ("pav", "pairwise"))
        self.strength = check_positive(strength, "strength")
        self.l1_weight = _check_weight(l1_weight, "l1_weight")

    def extra_repr(self) -> str:
        return f"method={self.method!r}, strength={self.strength}, l1_weight={self.l1_weight}"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of predicted ages ``pred`` (..., N) against true ages ``target`` (same shape).

        Returns:
            A scalar tensor, differentiable w.r.t. ``pred``.

        Raises:
            ShapeError: shapes differ (no broadcasting), pred is 0-d, or N < 2.
            InputError: non-tensor input, or NaN/inf in ``pred`` or ``target``.
        """
        pred, target = _check_pair(pred, target)
        n = pred.shape[-1]
        mean = pred.detach().mean(dim=-1, keepdim=True)
        std = pred.detach().std(dim=-1, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
        soft = self._soft_rank((pred - mean) / std, dim=-1, method=self.method,
                               strength=self.strength)
        wanted = rank(target, dim=-1).to(soft.dtype)
        loss = F.mse_loss(soft / n, wanted / n)
        if self.l1_weight > 0:
            loss = loss + self.l1_weight * F.l1_loss(pred, target)
        return loss


class BrainAgeLoss(nn.Module):
    """The brain-age objective: a regression term plus two independently weighted rank terms.

    total = regression + rank_weight · S + diff_weight · Ld

    with regression = MSE or L1 (years², years), S = ``rank(pred, target)`` (a Spearman
    surrogate, 0 when ``rank`` is None) and Ld = :func:`age_difference_loss` (years²). The two
    weights are independent, so S can be given weight without raising Ld's. The reference code
    of Cheng et al. (TMI 2021) writes the objective as MSE + λ(S + β·Ld) with λ = 10, β = 1,
    i.e. rank_weight = λ and diff_weight = λ·β; :meth:`reference` builds exactly that.

    S lives in (0, 1] while Ld = 2·var(e) (e = pred − target) is in years², and Ld's gradient
    2·2(e − ē)/(N − 1) is nearly parallel to the MSE's 2e/N: weigh the terms by the share of
    the gradient each carries (:mod:`rankcore.train.shares`), not by their values.

    A term whose weight is 0 is left out of the total altogether, so ``rank_weight=0`` gives
    bitwise the objective without a rank term; S is then still computed (without a graph) and
    reported in ``parts`` as a monitor.

    Args:
        regression: ``"mse"`` or ``"l1"``.
        rank: A :class:`SpearmanLoss`, a :class:`SoftSpearmanLoss`, or None (no rank term).
        rank_weight: w_rank >= 0, weight of S. Settable after construction (a calibrated
            weight, see :func:`rankcore.train.shares.calibrate_rank_weight`).
        diff_weight: w_diff >= 0, weight of Ld.

    Raises:
        InputError: unknown ``regression``, a ``rank`` that is not an nn.Module, or a
            negative or non-finite weight.
    """

    def __init__(self, regression: str = "mse", rank: nn.Module | None = None,
                 rank_weight: float = 1.0, diff_weight: float = 0.0):
        super().__init__()
        self.regression = check_choice(regression, "regression", ("mse", "l1"))
        if rank is not None and not isinstance(rank, nn.Module):
            raise InputError(f"`rank` must be a SpearmanLoss, a SoftSpearmanLoss or None, got "
                             f"{type(rank).__name__}")
        self.rank = rank
        self.rank_weight = rank_weight
        self.diff_weight = _check_weight(diff_weight, "diff_weight")

    @classmethod
    def reference(cls, rank: nn.Module | None, lam: float = 10.0,
                  beta: float = 1.0) -> BrainAgeLoss:
        """The reference's bracket form MSE + λ(S + β·Ld) (TMI 2021 code: λ = 10, β = 1).

        Raises:
            InputError: a negative or non-finite ``lam`` or ``beta``, or a bad ``rank``.
        """
        lam, beta = _check_weight(lam, "lam"), _check_weight(beta, "beta")
        return cls("mse", rank, rank_weight=lam, diff_weight=lam * beta)

    @property
    def rank_weight(self) -> float:
        """w_rank, the weight of the Spearman surrogate S (0 when ``rank`` is None)."""
        return self._rank_weight

    @rank_weight.setter
    def rank_weight(self, value: float) -> None:
        self._rank_weight = _check_weight(value, "rank_weight")

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each term in the total: ``{"regression": 1, "rank": w, "diff": w}``."""
        return {"regression": 1.0, "rank": self.rank_weight if self.rank is not None else 0.0,
                "diff": self.diff_weight}

    def extra_repr(self) -> str:
        return (f"regression={self.regression!r}, rank_weight={self.rank_weight}, "
                f"diff_weight={self.diff_weight}")

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms as scalars: ``"regression"``, ``"rank"`` (S) and ``"diff"`` (Ld).

        A term of weight 0 is computed without a graph (it cannot move the predictions);
        ``"rank"`` is a constant 0 when ``rank`` is None. Same arguments and errors as
        :meth:`forward`.
        """
        pred, target = _check_pair(pred, target)
        if self.regression == "mse":
            regression = F.mse_loss(pred, target)
        else:
            regression = F.l1_loss(pred, target)
        if self.rank is None:
            rank_term = pred.new_zeros(())
        elif self.rank_weight == 0:
            with torch.no_grad():
                rank_term = self.rank(pred, target)
        else:
            rank_term = self.rank(pred, target)
        if self.diff_weight == 0:
            with torch.no_grad():
                diff = age_difference_loss(pred, target)
        else:
            diff = age_difference_loss(pred, target)
        return {"regression": regression, "rank": rank_term, "diff": diff}

    def combine(self, terms: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, parts)`` from the output of :meth:`terms` (see :meth:`forward`)."""
        total = terms["regression"]
        for name, weight in self.weights.items():
            if name != "regression" and weight != 0:
                total = total + weight * terms[name]
        parts = dict(terms, total=total)
        return total, {key: value.detach() for key, value in parts.items()}

    def forward(self, pred: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts for predicted ages ``pred`` (..., N) and targets (same shape).

        Returns:
            ``(total, parts)``: the differentiable scalar total, and a dict of detached scalars
            with keys ``"regression"``, ``"rank"`` (S, unweighted), ``"diff"`` (Ld, unweighted)
            and ``"total"``.

        Raises:
            ShapeError: shapes differ (no broadcasting), pred is 0-d, or N < 2.
            SorterLengthError: the rank module's sorter was trained for another length.
            InputError: non-tensor input or NaN/inf in ``target``.
        """
        return self.combine(self.terms(pred, target))


def _check_weight(value: float, name: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a finite number >= 0, got {value!r}") from None
    if not (w >= 0.0 and w != float("inf")):
        raise InputError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return w
