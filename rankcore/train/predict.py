"""Forward passes shared by training and prediction: one step's model call, flips, batched
prediction over a SubjectData (optionally sharded over workers), and the validation metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from rankcore.errors import InputError
from rankcore.metrics import mae, pearson_r, rmse, srcc
from rankcore.models.cascade import CorrectionRegressor
from rankcore.train.data import SubjectData

__all__ = ["FLIP_DIM", "check_inputs", "evaluate", "flip_lr", "forward_batch", "predict"]

#: Image dim of a (B, C, X, Y, Z) batch that runs left-right (the RAS x axis).
FLIP_DIM = 2


def flip_lr(image: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror (B, C, X, Y, Z) images left-right (along RAS x); only rows where ``which``."""
    flipped = image.flip(FLIP_DIM)
    if which is None:
        return flipped
    return torch.where(which[:, None, None, None, None], flipped, image)


def _is_stage2(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps it as .module
    return isinstance(inner, CorrectionRegressor)


def forward_batch(model: nn.Module, batch: dict[str, torch.Tensor],
                  image: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted ages (B,) in years for a batch from :meth:`SubjectData.batch`.

    ``image`` overrides ``batch["image"]`` (for flipped or channels-last copies; the batch's
    ``hist_counts``, when present, hold for those too: a flip does not change them).
    """
    image = batch["image"] if image is None else image
    core = getattr(model, "module", model)  # DDP keeps the model in .module
    site = None
    if getattr(core, "config", None) is not None and core.config.sites:
        site = core.site_codes(batch.get("sites", ("n/a",) * len(image)), image.device)
    extra = {"hist_counts": batch["hist_counts"]} if "hist_counts" in batch else {}
    if getattr(getattr(core, "config", None), "features", ()):
        extra["features"] = batch.get("features")
    if _is_stage2(model):
        if "stage1" not in batch:
            raise InputError("stage 2 needs stage-1 estimates: attach them with "
                             "SubjectData.with_stage1 (out-of-fold predictions for training)")
        return model(image, batch["stage1"], batch["sex"], site, **extra)
    return model(image, batch["sex"], site, **extra)


@torch.no_grad()
def predict(model: nn.Module, data: SubjectData, *, batch_size: int = 32,
            flip_tta: bool = False, channels_last: bool = False, amp: bool = False,
            indices: Any = None) -> np.ndarray:
    """Predicted ages (years) of the subjects of ``data`` (all, or those at ``indices``).

    The model runs in eval mode on its own device; every subject is predicted exactly once (no
    padding of the last batch). With ``flip_tta`` each prediction is the mean of the image's
    and its left-right mirror's. The model's train/eval mode is restored afterwards.

    Returns:
        float64 array (n,) in the order of ``data`` (or of ``indices``).
    """
    check_inputs(model, data)
    param = next(model.parameters())
    device = param.device
    idx = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(idx), batch_size):
            batch = data.batch(idx[start:start + batch_size], device, model)
            image = batch["image"]
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type == "cuda"):
                pred = forward_batch(model, batch, image).float()
                if flip_tta:
                    pred = 0.5 * (pred + forward_batch(model, batch, flip_lr(image)).float())
            out.append(pred.cpu().double())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).numpy()


def check_inputs(model: nn.Module, data: SubjectData) -> None:
    """Raise InputError unless ``data`` has the image channels and tabular features that
    ``model`` was trained with (its ``config.in_channels`` and ``config.features``)."""
    config = getattr(getattr(model, "module", model), "config", None)
    if config is None:
        return
    if data.channels != config.in_channels:
        raise InputError(f"`data` must have the {config.in_channels} image channel(s) this "
                         f"model was trained with, got {data.channels} "
                         f"({', '.join(data.channel_names)})")
    if tuple(data.feature_names) != tuple(config.features):
        raise InputError(f"`data` must have the tabular features this model was trained with "
                         f"({list(config.features)}), got {list(data.feature_names)}")


def predict_sharded(model: nn.Module, data: SubjectData, world: Any, **kwargs: Any
                    ) -> np.ndarray:
    """:func:`predict` with each rank predicting a contiguous share, gathered on every rank."""
    if world is None or world.world_size == 1:
        return predict(model, data, **kwargs)
    shares = np.array_split(np.arange(len(data)), world.world_size)
    local = predict(model, data, indices=shares[world.rank], **kwargs)
    device = next(model.parameters()).device
    gathered = world.all_gather_varlen(torch.from_numpy(local).to(device))
    return gathered.cpu().double().numpy()


def evaluate(pred: Any, ages: Any) -> dict[str, float]:
    """MAE, RMSE (years), SRCC and Pearson r of predictions against true ages."""
    pred = np.asarray(pred, dtype=np.float64)
    ages = np.asarray(ages, dtype=np.float64)
    out = {"mae": float(mae(pred, ages)), "rmse": float(rmse(pred, ages))}
    if len(pred) >= 2:
        out["srcc"] = float(srcc(pred, ages))
        out["pearson_r"] = float(pearson_r(pred, ages))
    else:
        out["srcc"] = out["pearson_r"] = float("nan")
    return out
