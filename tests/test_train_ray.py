"""Ray Train (V2) on 2 CPU workers: the global-batch objective equals the single-process one,
and a 2-worker training run survives an injected worker failure by resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcore.train import TrainConfig, synthetic_subjects
from rankcore.train.objective import build_objective

pytestmark = pytest.mark.ray


def _single_process(config: TrainConfig, pred: np.ndarray, target: np.ndarray):
    p = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    objective = build_objective(config).double()
    total, parts = objective(p, torch.tensor(target, dtype=torch.float64))
    total.backward()
    return float(total.detach()), float(parts["rank"]), p.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("rank_loss", ["soft"])
def test_global_batch_ranking_loss_equals_single_process(ray_cluster, rank_loss):
    from rankcore.train.ray_train import global_batch_objective

    rng = np.random.default_rng(0)
    target = np.round(rng.uniform(20, 80, 16))  # integer ages: ties included
    pred = target + rng.normal(0, 5, 16)
    config = TrainConfig(batch_size=16, rank_loss=rank_loss, soft_method="pairwise")
    total, rank_term, grad = _single_process(config, pred, target)
    workers = global_batch_objective(config, pred, target, num_workers=2)
    assert [w["rank"] for w in workers] == [0, 1]
    for w in workers:
        assert w["total"] == pytest.approx(total, rel=1e-12)
        assert w["rank_term"] == pytest.approx(rank_term, rel=1e-12)
        assert rank_term > 0
    # each worker holds W x the gradient of its slice; DDP's average over W restores it
    got = np.concatenate([np.asarray(w["grad"]) for w in workers]) / 2
    np.testing.assert_allclose(got, grad, rtol=1e-10, atol=1e-12)
    # the per-worker (local-batch) ranking loss would differ: global really is global
    half_total, _, _ = _single_process(config, pred[:8], target[:8])
    assert abs(half_total - total) > 1e-6


@pytest.mark.slow
def test_two_workers_resume_after_injected_failure(ray_cluster, tmp_path):
    from rankcore.train.ray_train import train_stage_ray

    train, val = synthetic_subjects(32, seed=0), synthetic_subjects(8, seed=1)
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, device="cpu", num_threads=1)
    res = train_stage_ray(1, config, train, val, out_dir=tmp_path / "s1", num_workers=2,
                          max_failures=1, _fail_at_epoch=0)
    assert [e["epoch"] for e in res.history] == [-1, 0, 1]  # -1: scored before training
    assert res.card["resumes"] == [0]  # restarted workers continued after epoch 0
    assert res.card["world_size"] == 2
    assert (tmp_path / "s1" / "model.safetensors").exists()
    assert np.isfinite(res.history[-1]["val_mae"])


def test_cache_split_keys_read_only_those_rows_in_order(tmp_path):
    """CacheSplit(keys=...) names a fold / carved subset: the worker reads those rows only."""
    from _tiny_cohort import make_cache

    from rankcore.cache import VolumeDataset
    from rankcore.errors import InputError
    from rankcore.train.ray_train import CacheSplit

    cache = make_cache(tmp_path, 6)
    ds = VolumeDataset(cache)
    keys = (ds.keys[4], ds.keys[1], ds.keys[2])
    stage1 = {k: 40.0 + i for i, k in enumerate(keys)}
    data = CacheSplit(str(cache), keys=keys, stage1=stage1).load()
    assert list(data.participant_ids) == list(keys)
    np.testing.assert_array_equal(data.ages, [ds.ages[4], ds.ages[1], ds.ages[2]])
    np.testing.assert_array_equal(data.stage1, [40.0, 41.0, 42.0])
    got = data.batch(np.arange(3))["image"][:, 0].float().numpy()
    want = np.stack([np.asarray(ds.volume(i), np.float32) for i in (4, 1, 2)])
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert len(CacheSplit(str(cache)).load(preload=False)) == 6  # keys=None: every row
    with pytest.raises(InputError, match="`keys` must name rows"):
        CacheSplit(str(cache), keys=("sub-nope",)).load()
