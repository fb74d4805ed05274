"""A trained cascade applied to subjects: its preprocessing contract and its forward passes.

The model folder is loaded with :func:`rankcore.train.cascade.load_cascade`. Its card records
the :class:`~rankcore.mri.PreprocessConfig` of the cache it was trained on; every volume the
cascade sees at evaluation or prediction time must come from exactly that config
(:func:`model_preprocess`, :func:`check_preprocess`), since a preprocessing mismatch is the
top complaint about released brain-age models (FIELD.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rankcore.errors import CheckpointError, InputError
from rankcore.mri.types import PreprocessConfig

__all__ = ["check_preprocess", "describe_config", "model_preprocess", "predict_cascade"]


def model_preprocess(card: Mapping[str, Any]) -> PreprocessConfig:
    """The PreprocessConfig a cascade was trained on, from its card.

    Raises:
        CheckpointError: the card records no (or an unusable) preprocessing config.
    """
    stored = card.get("preprocess")
    if not isinstance(stored, Mapping):
        raise CheckpointError("the model card records no preprocessing config (`preprocess`): "
                              "it cannot say which volumes it was trained on")
    d = {k: v for k, v in stored.items() if k != "digest"}
    try:
        d["shape"] = tuple(d["shape"])
        config = PreprocessConfig(**d)
    except (KeyError, TypeError, InputError) as err:
        raise CheckpointError(f"the model card's preprocessing config is unusable: {err}") \
            from None
    if stored.get("digest") not in (None, config.digest()):
        raise CheckpointError(f"the model card's preprocessing config does not match its digest "
                              f"({stored.get('digest')} recorded, {config.digest()} computed)")
    return config


def describe_config(config: PreprocessConfig) -> str:
    """``"spacing 2 mm, shape (80, 96, 80), zscore_brain"``."""
    return (f"spacing {config.spacing:g} mm, shape {tuple(config.shape)}, "
            f"{config.normalise}")


def check_preprocess(card: Mapping[str, Any], *, spacing: float | None = None,
                     shape: Sequence[int] | None = None) -> PreprocessConfig:
    """The model's config, after checking the ``spacing`` / ``shape`` a caller expects.

    Args:
        card: the cascade card.
        spacing: expected voxel size (mm), or None (no expectation).
        shape: expected grid (3 voxel counts), or None.

    Raises:
        InputError: an expectation the model was not trained for (the message says what the
            model needs).
        CheckpointError: the card has no usable preprocessing config.
    """
    config = model_preprocess(card)
    problems = []
    if spacing is not None and float(spacing) != config.spacing:
        problems.append(f"spacing {float(spacing):g} mm")
    if shape is not None and tuple(int(s) for s in shape) != tuple(config.shape):
        problems.append(f"shape {tuple(int(s) for s in shape)}")
    if problems:
        raise InputError(f"model/cohort mismatch: the model was trained on volumes at "
                         f"{describe_config(config)}, not {' and '.join(problems)}; drop the "
                         "option (volumes are preprocessed with the model's own config) or use "
                         "a model trained for that grid")
    return config


def predict_cascade(cascade: Any, card: Mapping[str, Any], data: Any, *,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage-1 and final (cascade) ages of every subject of ``data``, each predicted once.

    The forward passes use the card's settings (flip test-time augmentation, autocast,
    channels-last) as training's own validation did, so the same subjects give the same
    numbers; the last batch is not padded.

    Args:
        cascade: :class:`rankcore.models.Cascade` (eval mode), on the device to use.
        card: its card (``config`` for stage 1, ``stage2_config`` for stage 2).
        data: :class:`rankcore.train.data.SubjectData` of the subjects.
        batch_size: subjects per forward pass (None: the card's ``eval_batch_size``).

    Returns:
        ``(stage1, final)``: float64 arrays (N,) of ages in years, in the order of ``data``.
    """
    from rankcore.train.predict import predict

    def kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {"batch_size": int(batch_size or cfg.get("eval_batch_size", 32)),
                "flip_tta": bool(cfg.get("flip_tta", False)),
                "channels_last": bool(cfg.get("channels_last", False)),
                "amp": bool(cfg.get("amp", False))}

    cfg1 = card.get("config") or {}
    cfg2 = card.get("stage2_config") or cfg1
    if len(data) == 0:
        return np.zeros(0), np.zeros(0)
    stage1 = predict(cascade.stage1, data, **kwargs(cfg1))
    final = predict(cascade.stage2, data.with_stage1(stage1), **kwargs(cfg2))
    return stage1, final
