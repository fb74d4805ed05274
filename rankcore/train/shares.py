"""Each objective term's share of the gradient with respect to the predictions.

The objective is total = Σ_k w_k · L_k over the terms k ∈ {regression, rank, diff} of
:class:`rankcore.losses.BrainAgeLoss` (w_regression = 1, w_rank, w_diff). On a batch of
predictions ŷ (N,) the gradient of term k is the weighted vector g_k = w_k · ∂L_k/∂ŷ (N,), its
norm is n_k = ‖g_k‖₂ (the "gnorm" of the term), and its share is

    share_k = n_k / Σ_j n_j,

the fraction of the summed gradient norms. Shares lie in [0, 1] and add up to 1; a term's
share does not depend on the angle between its gradient and the others' (Ld's gradient
2·2(e − ē)/(N − 1) is nearly parallel to the MSE's 2e/N, the Spearman term's is not). The
gradient is taken with respect to the predictions, not the parameters: it costs one backward
pass through the loss alone per term, and it is the same whatever the network. The parameter
gradient is Jᵀ Σ_k g_k (J = ∂ŷ/∂θ), so this is the split of what each term asks of the
predictions before the network's Jacobian mixes them.

Per epoch the norms are averaged over the steps (``train_gnorm_<term>``) and the shares are
taken from those averages (``train_share_<term>``): share_k = Σ_t n_k,t / Σ_t Σ_j n_j,t over the
steps t. With several workers every worker computes the norms on the gathered global batch.

Setting w_rank by a target share s (``TrainConfig.rank_share``):
:func:`calibrate_rank_weight` measures, on the initial model's predictions of a few training
batches, the mean norms R (regression), D (w_diff·Ld) and G (unweighted Spearman term) and
solves w_rank·G / (R + D + w_rank·G) = s, i.e. w_rank = s/(1 − s) · (R + D)/G.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rankcore.errors import InputError, TrainingError
from rankcore.losses import BrainAgeLoss
from rankcore.train.config import TrainConfig
from rankcore.train.predict import predict_sharded

__all__ = ["CALIBRATION_BATCHES", "TERMS", "calibrate_rank_weight", "epoch_shares",
           "gradient_norms", "loss_and_norms", "objective_record", "prepare_rank_weight",
           "share_text", "shares"]

log = logging.getLogger("rankcore.train")

#: The terms of BrainAgeLoss, in the order they are reported.
TERMS = ("regression", "rank", "diff")

#: Global batches of initial predictions that :func:`prepare_rank_weight` calibrates on.
CALIBRATION_BATCHES = 16


def gradient_norms(objective: BrainAgeLoss, terms: Mapping[str, torch.Tensor],
                   pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """‖w_k · ∂L_k/∂ŷ‖₂ for every term k of ``terms`` (from :meth:`BrainAgeLoss.terms`).

    Args:
        objective: the loss whose weights apply.
        terms: its unweighted scalar terms, computed from ``pred`` (graph kept).
        pred: the predictions (..., N) the terms were computed from.

    Returns:
        Detached scalars keyed ``"gnorm_regression"``, ``"gnorm_rank"``, ``"gnorm_diff"``; a
        term of weight 0, or one with no path to ``pred``, has norm 0. The graph is retained,
        so the total can still be backpropagated.
    """
    out = {}
    for name in TERMS:
        weight, term = objective.weights[name], terms[name]
        norm = pred.new_zeros((), dtype=term.dtype)
        if weight != 0 and term.requires_grad and pred.requires_grad:
            (grad,) = torch.autograd.grad(term, pred, retain_graph=True, allow_unused=True)
            if grad is not None:
                norm = weight * torch.linalg.vector_norm(grad.detach())
        out[f"gnorm_{name}"] = norm.detach()
    return out


def loss_and_norms(objective: BrainAgeLoss, pred: torch.Tensor, target: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``objective(pred, target)`` with the gradient norms of :func:`gradient_norms` added.

    Returns:
        ``(total, parts)`` as :meth:`BrainAgeLoss.forward`, ``parts`` also holding the
        ``"gnorm_<term>"`` scalars. The total is the same tensor value as the plain call's.
    """
    terms = objective.terms(pred, target)
    total, parts = objective.combine(terms)
    parts.update(gradient_norms(objective, terms, pred))
    return total, parts


def shares(norms: Mapping[str, float]) -> dict[str, float]:
    """share_k = n_k / Σ_j n_j for norms keyed by term (``"regression"`` …) or ``"gnorm_…"``.

    Returns:
        Shares keyed by term name; NaN for every term when all norms are 0.
    """
    values = {key.removeprefix("gnorm_"): float(v) for key, v in norms.items()}
    total = sum(values.values())
    if not total > 0:
        return {key: math.nan for key in values}
    return {key: v / total for key, v in values.items()}


def epoch_shares(metrics: Mapping[str, Any], objective: BrainAgeLoss) -> dict[str, float]:
    """Per-epoch entries from the epoch means ``train_gnorm_<term>`` of ``metrics``.

    Returns:
        ``train_share_<term>`` for every term (see the module docstring) and the weights in
        force, ``rank_weight`` and ``diff_weight`` (the resolved w_rank, calibrated or not).
    """
    norms = {name: metrics.get(f"train_gnorm_{name}", 0.0) for name in TERMS}
    out = {f"train_share_{name}": v for name, v in shares(norms).items()}
    out["rank_weight"] = objective.weights["rank"]
    out["diff_weight"] = objective.diff_weight
    return out


def share_text(metrics: Mapping[str, Any]) -> str:
    """`` | grad share reg 0.900 rank 0.100 diff 0.000`` for a training log line."""
    if "train_share_regression" not in metrics:
        return ""
    cells = " ".join(f"{short} {metrics[f'train_share_{name}']:.3f}"
                     for short, name in (("reg", "regression"), ("rank", "rank"),
                                         ("diff", "diff")))
    return f" | grad share {cells} (w_rank {metrics['rank_weight']:.4g})"


def calibrate_rank_weight(objective: BrainAgeLoss, pred: torch.Tensor, target: torch.Tensor,
                          share: float, batch_size: int) -> dict[str, Any]:
    """Set ``objective.rank_weight`` so that the Spearman term carries ``share`` of the gradient.

    ``pred`` and ``target`` (M,) are cut into ⌊M / batch_size⌋ consecutive batches (the rest
    is dropped, as in training). On each, the norms of the regression gradient, of
    w_diff·∂Ld/∂ŷ and of the UNWEIGHTED ∂S/∂ŷ are measured; with their means R, D and G,
    w_rank = share/(1 − share) · (R + D)/G (module docstring). ``share = 0`` gives 0 exactly.

    Args:
        objective: a BrainAgeLoss with a rank term; its ``rank_weight`` is overwritten.
        pred: initial predictions (M,), years; detached inside.
        target: true ages (M,), years.
        share: target share in [0, 1).
        batch_size: the global training batch (the Spearman term ranks this many at once).

    Returns:
        The calibration record: ``rank_share``, ``rank_weight``, ``batches`` and the mean
        norms ``gnorm_regression``, ``gnorm_diff``, ``gnorm_rank_unit`` (G).

    Raises:
        InputError: no rank term, a share outside [0, 1), or fewer than ``batch_size`` values.
        TrainingError: the Spearman term has no gradient on these predictions.
    """
    if objective.rank is None:
        raise InputError("`objective` must have a rank term to calibrate its weight, got "
                         "rank=None")
    if not (isinstance(share, int | float) and 0 <= share < 1):
        raise InputError(f"`share` must be a number in [0, 1), got {share!r}")
    n_batches = len(pred) // batch_size
    if pred.ndim != 1 or n_batches < 1:
        raise InputError(f"`pred` must hold at least one batch of {batch_size} values, got "
                         f"shape {tuple(pred.shape)}")
    sums = dict.fromkeys(TERMS, 0.0)
    objective.rank_weight = 1.0  # unit weight: the graph of S is built and its norm is G
    for b in range(n_batches):
        p = pred[b * batch_size:(b + 1) * batch_size].detach().clone().requires_grad_(True)
        t = target[b * batch_size:(b + 1) * batch_size]
        norms = gradient_norms(objective, objective.terms(p, t), p)
        for name in TERMS:
            sums[name] += float(norms[f"gnorm_{name}"])
    mean = {name: v / n_batches for name, v in sums.items()}
    if share == 0:
        weight = 0.0
    elif not mean["rank"] > 0:
        raise TrainingError("the Spearman term has no gradient on the initial predictions "
                            f"(mean norm {mean['rank']}), so `rank_share` {share} cannot be "
                            "reached: set `rank_weight` instead")
    else:
        weight = share / (1.0 - share) * (mean["regression"] + mean["diff"]) / mean["rank"]
    objective.rank_weight = weight
    return {"rank_share": float(share), "rank_weight": weight, "batches": n_batches,
            "gnorm_regression": mean["regression"], "gnorm_diff": mean["diff"],
            "gnorm_rank_unit": mean["rank"]}


def prepare_rank_weight(objective: BrainAgeLoss, config: TrainConfig, model: torch.nn.Module,
                        data: Any, world: Any = None,
                        resumed: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Resolve w_rank before the first epoch of a stage when ``config.rank_share`` is set.

    A resumed run takes the weight recorded in its card (``resumed``, the card's
    ``"objective"`` block), so it continues with the objective it started with. Otherwise
    the model (eval mode, no flips) predicts the first :data:`CALIBRATION_BATCHES` global
    batches of a permutation seeded by ``config.seed`` (its own generator: the global RNG is
    untouched), and :func:`calibrate_rank_weight` sets the weight from those predictions.

    Args:
        objective: the stage's BrainAgeLoss (on the training device).
        config: the stage's TrainConfig.
        model: the initialised stage model (histogram prior fitted).
        data: the training :class:`rankcore.train.data.SubjectData`.
        world: None, or the distributed world (every rank gets the same predictions).
        resumed: the ``"objective"`` block of the checkpoint's card when resuming.

    Returns:
        The calibration record (None when ``rank_share`` is not set).
    """
    if config.rank_share is None:
        return None
    if resumed and resumed.get("calibration"):
        objective.rank_weight = resumed["rank_weight"]
        return dict(resumed["calibration"])
    gen = torch.Generator().manual_seed(config.seed)
    n = min(len(data), CALIBRATION_BATCHES * config.batch_size)
    n -= n % config.batch_size
    idx = torch.randperm(len(data), generator=gen).numpy()[:n]
    subset = data.subset(idx)
    pred = predict_sharded(model, subset, world, batch_size=config.eval_batch_size,
                           channels_last=config.channels_last, amp=config.amp)
    device = next(model.parameters()).device
    record = calibrate_rank_weight(
        objective, torch.as_tensor(pred, dtype=torch.float32, device=device),
        torch.as_tensor(np.asarray(subset.ages), dtype=torch.float32, device=device),
        config.rank_share, config.batch_size)
    log.info("rank_share %.3g: w_rank calibrated to %.4g on %d initial batches",
             config.rank_share, record["rank_weight"], record["batches"])
    return record


def objective_record(config: TrainConfig, objective: BrainAgeLoss,
                     calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card's ``"objective"`` block: the formula, preset, surrogate and resolved weights."""
    return {"formula": "regression + rank_weight * rank + diff_weight * diff",
            "preset": config.objective_preset, "regression": config.regression,
            "rank_loss": config.rank_loss, "rank_weight": objective.weights["rank"],
            "diff_weight": objective.diff_weight, "rank_share": config.rank_share,
            "calibration": None if calibration is None else dict(calibration)}
