"""Before the first epoch of a stage: the model's inputs from the training data, and the
starting point scored as epoch -1.

The training loop (:mod:`rankcore.train.loop`) builds the model from
:func:`with_training_inputs` (its sites, image channels and tabular features are the training
data's) and, with validation data, scores the model with its residual zeroed
(:func:`score_start`): the prior alone for stage 1, no correction for stage 2. That score is
epoch -1 of the history, and early stopping keeps that state unless an epoch beats it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rankcore.errors import InputError
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData
from rankcore.train.predict import evaluate, predict_sharded

__all__ = ["score_start", "with_training_inputs", "with_training_sites"]

log = logging.getLogger("rankcore.train")


def with_training_sites(config: TrainConfig, train: SubjectData) -> TrainConfig:
    """``config`` with ``backbone.sites`` set to the training data's sites (sorted) when
    ``site_input`` is on, no sites were given, and the data come from >= 2 known sites."""
    if not config.site_input or config.backbone.sites:
        return config
    sites = tuple(sorted({s for s in train.sites if s and s != "n/a"}))
    if len(sites) < 2:
        return config
    return config.replace(backbone=replace(config.backbone, sites=sites))


def with_training_inputs(config: TrainConfig, train: SubjectData,
                         val: SubjectData | None = None) -> TrainConfig:
    """``config`` with the model's inputs taken from the training data: ``backbone.sites``
    (see :func:`with_training_sites`), ``backbone.in_channels`` (the data's image channels)
    and ``backbone.features`` (the data's tabular feature names).

    Raises:
        InputError: ``val`` has other image channels or features than ``train``.
    """
    if val is not None and (val.channels, val.feature_names) != (train.channels,
                                                                 train.feature_names):
        raise InputError(f"`val_data` must have the training data's {train.channels} image "
                         f"channel(s) and features {list(train.feature_names)}, got "
                         f"{val.channels} and {list(val.feature_names)}")
    config = with_training_sites(config, train)
    return config.replace(backbone=replace(config.backbone, in_channels=train.channels,
                                           features=tuple(train.feature_names)))


def score_start(stage: int, model: nn.Module, config: TrainConfig, val: SubjectData,
                 world: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Validation metrics (epoch -1) and weights of ``model`` with its residual zeroed: the
    prior alone (stage 1) or no correction (stage 2)."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.zero_residual()
    pred = predict_sharded(model, val, world, batch_size=config.eval_batch_size,
                           flip_tta=config.flip_tta, channels_last=config.channels_last,
                           amp=config.amp)
    prior_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    metrics = {"epoch": -1, "lr": 0.0, **{f"val_{k}": v for k, v in
                                          evaluate(pred, val.ages).items()}}
    log.info("stage %d before training (%s, kept unless training beats it): val MAE %.2f "
             "SRCC %.3f", stage,
             "the prior alone" if stage == 1 else "no correction", metrics["val_mae"],
             metrics["val_srcc"])
    return metrics, prior_state
