"""Gradient shares of the objective's terms: finite differences, calibration by target share,
w_rank = 0 as the exact no-ranking objective, the objective's config fields."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankcore.errors import InputError
from rankcore.losses import BrainAgeLoss, SoftSpearmanLoss, SpearmanLoss, age_difference_loss
from rankcore.ranks import rank
from rankcore.soft import soft_rank
from rankcore.train import TrainConfig, synthetic_subjects, train_stage
from rankcore.train.config import DEFAULT_RANK_WEIGHT
from rankcore.train.objective import build_objective
from rankcore.train.shares import (
    TERMS,
    calibrate_rank_weight,
    epoch_shares,
    gradient_norms,
    loss_and_norms,
    shares,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (16, 20, 16)


class SmoothSorter(nn.Module):
    """A fixed, smooth, length-agnostic stand-in for a learned sorter (float64-friendly)."""

    seq_len = None
    kind = "smooth"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - x.mean(-1, keepdim=True)) / 10.0
        return torch.sigmoid(-(z.unsqueeze(-1) - z.unsqueeze(-2))).mean(-1)



def _epochs(result) -> list[dict]:
    """The training epochs of a stage's history (epoch -1, the prior scored before training,
    has no training terms)."""
    return [m for m in result.history if m["epoch"] >= 0]

def _batch(seed: int, n: int = 16, sd: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(20, 80, (n,), generator=g).double()
    return target + sd * torch.randn(n, dtype=torch.float64, generator=g), target


def _fd_grad(fn, pred: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite-difference gradient of the scalar ``fn`` at ``pred`` (float64)."""
    grad = torch.zeros_like(pred)
    for i in range(len(pred)):
        up, down = pred.clone(), pred.clone()
        up[i] += eps
        down[i] -= eps
        grad[i] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def _fd_terms(objective: BrainAgeLoss, pred: torch.Tensor, target: torch.Tensor):
    """Finite-difference norms of each WEIGHTED term at ``pred``, as the training uses them:
    for the soft Spearman term the batch's mean and std are held at their values at ``pred``
    (SoftSpearmanLoss treats them as constants in the backward pass)."""
    pred, target = pred.detach().double(), target.double()
    rank_fn = objective.rank
    if isinstance(rank_fn, SoftSpearmanLoss):
        m, s, n = pred.mean(), pred.std(), len(pred)

        def spearman(p):
            soft = soft_rank((p - m) / s, method=rank_fn.method, strength=rank_fn.strength)
            return F.mse_loss(soft / n, rank(target) / n)
    else:
        def spearman(p):
            return rank_fn(p, target)
    reg = (lambda p: F.mse_loss(p, target)) if objective.regression == "mse" else \
        (lambda p: F.l1_loss(p, target))
    fns = {"regression": reg, "rank": spearman,
           "diff": lambda p: age_difference_loss(p, target)}
    w = objective.weights
    return {k: w[k] * float(torch.linalg.vector_norm(_fd_grad(fns[k], pred))) for k in TERMS}


@pytest.mark.parametrize("surrogate", ["soft-pairwise", "soft-pav", "sorter"])
def test_gradient_norms_and_shares_match_finite_differences(surrogate):
    pred, target = _batch(1)
    if surrogate == "sorter":
        rank_fn = SpearmanLoss(SmoothSorter())
    else:
        rank_fn = SoftSpearmanLoss(surrogate.split("-")[1], 0.25)
    objective = BrainAgeLoss("mse", rank_fn, rank_weight=300.0, diff_weight=0.5)
    p = pred.clone().requires_grad_(True)
    total, parts = loss_and_norms(objective, p, target)
    fd = _fd_terms(objective, pred, target)
    for k in TERMS:
        assert fd[k] > 0
        assert float(parts[f"gnorm_{k}"]) == pytest.approx(fd[k], rel=1e-6)
    got, want = shares({k: parts[f"gnorm_{k}"] for k in TERMS}), shares(fd)
    assert sum(got.values()) == pytest.approx(1.0)
    for k in TERMS:
        assert got[k] == pytest.approx(want[k], rel=1e-6)
    # the norms keep the graph: the total still backpropagates, to the plain call's gradient
    total.backward()
    q = pred.clone().requires_grad_(True)
    objective(q, target)[0].backward()
    assert torch.equal(p.grad, q.grad)


def test_gradient_norms_of_zero_weight_terms_are_zero():
    pred, target = _batch(2)
    objective = BrainAgeLoss("mse", SoftSpearmanLoss("pairwise", 0.05), rank_weight=0.0,
                             diff_weight=0.0)
    p = pred.clone().requires_grad_(True)
    norms = gradient_norms(objective, objective.terms(p, target), p)
    assert float(norms["gnorm_rank"]) == 0.0 and float(norms["gnorm_diff"]) == 0.0
    assert float(norms["gnorm_regression"]) > 0
    assert shares(norms) == {"regression": 1.0, "rank": 0.0, "diff": 0.0}
    assert all(math.isnan(v) for v in shares({"regression": 0.0, "rank": 0.0}).values())


@pytest.mark.parametrize("share", [0.0, 0.03, 0.1, 0.3])
def test_calibrated_weight_gives_the_target_share(share):
    preds, targets = zip(*(_batch(s) for s in range(4)))
    pred, target = torch.cat(preds), torch.cat(targets)
    objective = BrainAgeLoss("mse", SoftSpearmanLoss("pairwise", 0.05), diff_weight=0.2)
    record = calibrate_rank_weight(objective, pred, target, share, batch_size=16)
    assert record["batches"] == 4 and objective.rank_weight == record["rank_weight"]
    if share == 0:
        assert objective.rank_weight == 0.0
    # the mean norms over the same batches, with the calibrated weight, give the share
    sums = dict.fromkeys(TERMS, 0.0)
    for b in range(4):
        p = pred[16 * b:16 * (b + 1)].clone().requires_grad_(True)
        _, parts = loss_and_norms(objective, p, target[16 * b:16 * (b + 1)])
        for k in TERMS:
            sums[k] += float(parts[f"gnorm_{k}"])
    assert shares(sums)["rank"] == pytest.approx(share, abs=1e-12)
    with pytest.raises(InputError, match="`share`"):
        calibrate_rank_weight(objective, pred, target, 1.0, batch_size=16)
    with pytest.raises(InputError, match="`pred`"):
        calibrate_rank_weight(objective, pred[:8], target[:8], 0.1, batch_size=16)


def test_objective_config_fields():
    default = TrainConfig()
    assert (default.rank_loss, default.soft_method, default.soft_strength) == \
        ("soft", "pairwise", 0.05)
    assert default.objective_weights() == (DEFAULT_RANK_WEIGHT, 0.0)
    assert TrainConfig(objective_preset="reference").objective_weights() == (10.0, 10.0)
    assert TrainConfig(rank_weight=0.0, diff_weight=1.5).objective_weights() == (0.0, 1.5)
    assert TrainConfig(rank_share=0.1).objective_weights() == (None, 0.0)
    assert TrainConfig(rank_loss="none", rank_weight=3.0).objective_weights() == (0.0, 0.0)
    ref = build_objective(TrainConfig(objective_preset="reference"))
    assert (ref.rank_weight, ref.diff_weight) == (10.0, 10.0)
    assert build_objective(TrainConfig(rank_share=0.2)).rank_weight == 0.0  # until calibrated
    cfg = TrainConfig.from_dict({"rank_share": 0.3, "objective_preset": "default"})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    bad = [({"rank_share": 0.1, "rank_weight": 2.0}, "`rank_weight` must be None"),
           ({"rank_share": 1.0}, "`rank_share` must be in"),
           ({"rank_share": 0.1, "rank_loss": "none"}, "`rank_share` must be None"),
           ({"objective_preset": "reference", "diff_weight": 1.0}, "`diff_weight` must be None"),
           ({"objective_preset": "reference", "rank_share": 0.1}, "`rank_share` must be None"),
           ({"objective_preset": "reference", "regression": "l1"}, "`regression` must be"),
           ({"objective_preset": "tsan"}, "`objective_preset` must be one of"),
           ({"rank_weight": -1.0}, "`rank_weight` must be")]
    for changes, message in bad:
        with pytest.raises(InputError, match=message):
            TrainConfig.from_dict(changes)


# ---- inside training ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort():
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch._dynamo's import here
    return synthetic_subjects(32, SHAPE, seed=0), synthetic_subjects(8, SHAPE, seed=1)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cpu", "seed": 0}
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_logged_shares_equal_finite_differences_on_the_training_predictions(
        cohort, tmp_path, monkeypatch, caplog):
    train, val = cohort
    one_batch = train.subset(np.arange(8))  # one step per epoch: the epoch mean is that step
    seen = []
    terms = BrainAgeLoss.terms

    def recording(objective, pred, target):  # wherever the loop lives, it calls terms()
        if pred.requires_grad:
            seen.append((objective, pred.detach().clone(), target.detach().clone()))
        return terms(objective, pred, target)

    monkeypatch.setattr(BrainAgeLoss, "terms", recording)
    config = _cfg(rank_weight=50.0, diff_weight=0.5)
    with caplog.at_level(logging.INFO, logger="rankcore.train"):
        res = train_stage(1, config, one_batch, val, out_dir=tmp_path / "s1")
    assert len(seen) == 2 and len(_epochs(res)) == 2
    for (objective, pred, target), m in zip(seen, _epochs(res)):
        fd = _fd_terms(objective, pred, target)
        for k in TERMS:  # training ran in float32: its norms agree to float32 precision
            assert m[f"train_gnorm_{k}"] == pytest.approx(fd[k], rel=2e-4)
            assert m[f"train_share_{k}"] == pytest.approx(shares(fd)[k], rel=2e-4, abs=1e-7)
        assert m["rank_weight"] == 50.0 and m["diff_weight"] == 0.5
    lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    share = _epochs(res)[0]["train_share_rank"]
    assert any(f"rank {share:.3f}" in line and "grad share" in line for line in lines)
    objective_card = res.card["objective"]
    assert (objective_card["rank_weight"], objective_card["diff_weight"]) == (50.0, 0.5)
    assert objective_card["calibration"] is None
    assert res.card["history"][1]["train_share_rank"] == share  # [0]: epoch -1


def test_rank_share_calibrates_once_and_is_recorded(cohort, tmp_path):
    train, val = cohort
    res = train_stage(1, _cfg(rank_share=0.3), train, val, out_dir=tmp_path / "s1")
    record = res.card["objective"]
    assert record["rank_share"] == 0.3 and record["calibration"]["batches"] == 4
    weight = record["rank_weight"]
    assert weight == record["calibration"]["rank_weight"] > 0
    assert [m["rank_weight"] for m in _epochs(res)] == [weight, weight]  # fixed after calibration
    first = _epochs(res)[0]["train_share_rank"]
    assert 0.05 < first < 0.8  # near the target; training moves it


def test_rank_share_calibrates_stage2_on_its_own_initial_predictions(cohort, tmp_path):
    train, val = cohort
    rng = np.random.default_rng(0)
    s1_train = train.ages + rng.normal(0, 6, len(train))
    s1_val = val.ages + rng.normal(0, 6, len(val))
    res = train_stage(2, _cfg(epochs=1, rank_share=0.1), train.with_stage1(s1_train),
                      val.with_stage1(s1_val), out_dir=tmp_path / "s2")
    record = res.card["objective"]["calibration"]
    assert record["rank_weight"] > 0 and record["gnorm_regression"] > 0
    assert _epochs(res)[0]["rank_weight"] == record["rank_weight"]


def test_rank_weight_zero_is_exactly_the_objective_without_ranking(cohort, tmp_path):
    train, val = cohort
    runs = {}
    for name, changes in (("none", {"rank_loss": "none", "diff_weight": 0.5}),
                          ("soft-w0", {"rank_weight": 0.0, "diff_weight": 0.5}),
                          ("soft-share0", {"rank_share": 0.0, "diff_weight": 0.5})):
        runs[name] = train_stage(1, _cfg(**changes), train, val, out_dir=tmp_path / name)
    ref = runs["none"]
    ref_state = ref.model.state_dict()
    for name in ("soft-w0", "soft-share0"):
        res = runs[name]
        state = res.model.state_dict()
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state), name
        for m, m0 in zip(_epochs(res), _epochs(ref)):
            assert m["train_total"] == m0["train_total"]
            assert m["train_regression"] == m0["train_regression"]
            assert m["val_mae"] == m0["val_mae"]
            assert m["train_share_rank"] == 0.0
        assert _epochs(res)[0]["train_rank"] > 0  # the soft Spearman term is still monitored
    assert runs["soft-share0"].card["objective"]["rank_weight"] == 0.0


def test_epoch_shares_from_means():
    objective = BrainAgeLoss("mse", SoftSpearmanLoss(), rank_weight=2.0, diff_weight=0.0)
    out = epoch_shares({"train_gnorm_regression": 3.0, "train_gnorm_rank": 1.0,
                        "train_gnorm_diff": 0.0}, objective)
    assert out == {"train_share_regression": 0.75, "train_share_rank": 0.25,
                   "train_share_diff": 0.0, "rank_weight": 2.0, "diff_weight": 0.0}


def test_resume_keeps_the_calibrated_weight(cohort, tmp_path):
    train, val = cohort
    cfg = _cfg(epochs=3, rank_share=0.2)
    full = train_stage(1, cfg, train, val, out_dir=tmp_path / "full")

    def crash_after_first_epoch(metrics, path):
        if metrics["epoch"] == 0:
            raise KeyboardInterrupt  # stands for a killed worker

    with pytest.raises(KeyboardInterrupt):
        train_stage(1, cfg, train, val, out_dir=tmp_path / "cut", report=crash_after_first_epoch)
    resumed = train_stage(1, cfg, train, val, out_dir=tmp_path / "cut", resume=True)
    # recalibrating on the epoch-0 model would give another weight, and other weights
    assert resumed.card["objective"] == full.card["objective"]
    assert [m["rank_weight"] for m in _epochs(resumed)] == [m["rank_weight"] for m in _epochs(full)]
    state, ref = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in ref)
