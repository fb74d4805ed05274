"""Batch-norm refresh: the running statistics become the exact batch statistics of the current
weights on the chosen training subjects, and training with it runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcore.models import BackboneConfig
from rankcore.train import TrainConfig, synthetic_subjects, train_stage
from rankcore.train.bn_refresh import refresh_batch_norm
from rankcore.train.checkpoint import build_stage_model
from rankcore.train.config import CascadeConfig
from rankcore.train.predict import forward_batch

SHAPE = (16, 20, 16)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(data):
    model = build_stage_model(1, BackboneConfig(growth=(4, 8), feature_norm="batch"),
                              CascadeConfig())
    model.set_age_scale(float(np.mean(data.ages)), float(np.std(data.ages)))
    return model


def test_refresh_sets_the_exact_feature_statistics_of_the_subset():
    data = synthetic_subjects(12, SHAPE, seed=3)
    model = _model(data)
    norm = model.backbone.feature_norm
    norm.running_mean.fill_(5.0)  # a stale average, far from the features
    norm.running_var.fill_(9.0)
    captured = []
    hook = norm.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    model.eval()
    used = refresh_batch_norm(model, data, torch.device("cpu"), subjects=12, batch_size=12,
                              seed=0)
    hook.remove()
    assert used == 12 and not model.training and norm.momentum == 0.1
    feats = torch.cat(captured)
    assert torch.allclose(norm.running_mean, feats.mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, feats.var(0, unbiased=True), rtol=1e-4, atol=1e-6)
    # the refreshed statistics standardise these subjects' features in evaluation mode
    with torch.no_grad():
        out = norm(feats)
    assert float(out.mean(0).abs().max()) < 1e-4


def test_refresh_changes_only_batch_norm_buffers_and_skips_a_model_without_them():
    data = synthetic_subjects(9, SHAPE, seed=4)
    model = _model(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refresh_batch_norm(model, data, torch.device("cpu"), subjects=9, batch_size=4, seed=1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("backbone.feature_norm.") for k in changed)
    plain = build_stage_model(1, BackboneConfig(growth=(4, 8), feature_norm="layer"),
                              CascadeConfig())
    assert refresh_batch_norm(plain, data, torch.device("cpu"), 9, 4, 0) == 0
    with torch.no_grad():  # the refreshed model still predicts finite ages
        model.eval()
        assert torch.isfinite(forward_batch(model, data.batch(np.arange(9)))).all()


def test_training_with_refresh_runs_and_is_recorded_in_the_config(tmp_path):
    train = synthetic_subjects(24, SHAPE, seed=0)
    val = synthetic_subjects(8, SHAPE, seed=1)
    cfg = TrainConfig.from_dict({"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cpu",
                                 "seed": 0, "bn_refresh": 16,
                                 "backbone": {"growth": [4, 8], "feature_norm": "batch"}})
    result = train_stage(1, cfg, train, val, out_dir=tmp_path / "stage1")
    assert result.card["train_config"]["bn_refresh"] == 16
    assert all(np.isfinite(m["val_mae"]) for m in result.history)
    with pytest.raises(Exception, match="bn_refresh"):
        TrainConfig.from_dict({"bn_refresh": -1})


def test_non_finite_refreshed_statistics_raise_and_keep_the_old_ones():
    from rankcore.errors import TrainingError

    data = synthetic_subjects(8, SHAPE, seed=5)
    model = _model(data)
    norm = model.backbone.feature_norm
    before = norm.running_mean.clone()
    real = data.batch

    def poisoned(indices, device="cpu", model=None):
        out = real(indices, device, model)
        out["image"] = torch.full_like(out["image"], float("nan"))
        return out

    data.batch = poisoned
    with pytest.raises(TrainingError, match="batch-norm statistics"):
        refresh_batch_norm(model, data, torch.device("cpu"), 8, 4, 0)
    assert torch.equal(norm.running_mean, before) and norm.momentum == 0.1
