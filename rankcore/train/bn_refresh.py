"""Batch-norm statistics recomputed from training subjects before a model is scored.

During training, batch norm standardises each mini-batch by its own statistics and keeps an
exponential running average of them for evaluation. With small batches and weights that move
every step, that average lags the current weights, and the evaluated model sees features on
another scale than the trained one sees: a shift of every prediction, not of their order.
:func:`refresh_batch_norm` replaces the running statistics with the exact average of the batch
statistics of the current weights over a fixed subset of the training subjects (no gradient,
nothing else changes), as "precise BN" does (Wu and Johnson, 2021).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rankcore.errors import TrainingError
from rankcore.train.predict import forward_batch

__all__ = ["refresh_batch_norm"]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def refresh_batch_norm(model: nn.Module, data, device: torch.device, subjects: int,
                       batch_size: int, seed: int) -> int:
    """Recompute every batch-norm layer's running statistics of ``model`` on training data.

    Args:
        model: a stage model (not a DDP wrapper: every worker refreshes its own copy on the
            same subjects, so the copies stay equal).
        data: the training :class:`~rankcore.train.data.SubjectData`.
        device: where the forward passes run.
        subjects: how many training subjects (a seeded random subset; all if fewer).
        batch_size: subjects per forward pass (>= 2; a last batch of one joins the one before).
        seed: seeds the subset.

    Returns:
        The number of subjects used (0 when the model has no batch norm or ``subjects`` is 0).

    Raises:
        TrainingError: the refreshed statistics are not finite (NaN or inf in the features of
            the chosen subjects); the model keeps its earlier statistics.
    """
    norms = _batch_norms(model)
    n = min(int(subjects), len(data))
    if not norms or n < 2:
        return 0
    pick = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    size = max(2, int(batch_size))
    chunks = [pick[i:i + size] for i in range(0, n, size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    was_training = model.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for chunk in chunks:
                batch = data.batch(chunk, device, model)
                forward_batch(model, batch)
        bad = [m for m in norms if not (torch.isfinite(m.running_mean).all()
                                         and torch.isfinite(m.running_var).all())]
        if bad:
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
            raise TrainingError(f"the batch-norm statistics recomputed from {n} training "
                                "subjects are NaN or inf: check the training inputs")
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return n
