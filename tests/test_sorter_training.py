"""Sorter pretraining (issue 4): targets, config, the in-process loop, resume, the Ray Train run
inside the Prefect flow, the evaluation measures and the shipped checkpoints.

Budgets are step counts (never seconds): the machine is shared and its load varies.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from rankcore.errors import InputError, SorterLengthError
from rankcore.losses import SoftSpearmanLoss, SpearmanLoss
from rankcore.ranks import get_tiedrank
from rankcore.sorters import CONVENTION, SequenceSampler, build_sorter, load_sorter
from rankcore.sorters.evaluation import (
    Surrogate,
    accuracy_suite,
    evaluate_surrogate,
    exact_surrogate,
    gradient_agreement,
    rank_error,
    rank_spearman,
    soft_surrogate,
    sorter_surrogate,
    summarize,
)
from rankcore.sorters.shipped import list_pretrained, load_pretrained
from rankcore.train.sorter import (
    VAL_SEED,
    pretrain_sorter_local,
    smoothed_target,
    train_sorter,
)
from rankcore.train.sorter_config import SorterTrainConfig
from rankcore.train.sorter_state import latest_state

REPO = Path(__file__).resolve().parents[1]
TINY = {"kind": "pairwise", "seq_len": [12], "sizes": {"hidden_size": 8}, "steps": 6,
        "batch_size": 16, "lr": 1e-2, "eval_every": 3, "checkpoint_every": 3, "eval_rows": 4,
        "eval_lengths": [12], "device": "cpu"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scipy_sodeep(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    return (n + 1 - rankdata(x, axis=-1, method="average")) / n


# --- smoothed targets ---------------------------------------------------------------------------

def test_smoothed_target_is_exact_at_zero_and_in_the_limit():
    x, exact = SequenceSampler(3, 20, 32).batch(0)
    assert torch.equal(smoothed_target(x, 0.0), exact)
    x64 = x.double()
    tiny = smoothed_target(x64, 1e-9)
    np.testing.assert_allclose(tiny.numpy(), _scipy_sodeep(x64.numpy()), atol=1e-12)


def test_smoothed_target_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (16, 24), generator=gen).double() * 7.3 + 40.0  # heavy ties
    t = smoothed_target(x, 0.3)
    n = x.shape[-1]
    np.testing.assert_allclose(t.sum(-1).numpy(), (n + 1) / 2, rtol=1e-12)  # ranks' total
    same = x.unsqueeze(-1) == x.unsqueeze(-2)
    assert bool(((t.unsqueeze(-1) == t.unsqueeze(-2)) | ~same).all())      # ties share a value
    bigger = x.unsqueeze(-1) > x.unsqueeze(-2)
    assert bool(((t.unsqueeze(-1) < t.unsqueeze(-2)) | ~bigger).all())     # descending, strict
    np.testing.assert_allclose(smoothed_target(x * 0.01 - 3.0, 0.3).numpy(), t.numpy(),
                               atol=1e-12)                                   # scale-free
    # a wider smoothing pulls every target towards the middle (N + 1)/(2N)
    mid = (n + 1) / (2 * n)
    assert float((smoothed_target(x, 1.0) - mid).abs().mean()) < float((t - mid).abs().mean())


# --- configuration ------------------------------------------------------------------------------

def test_config_round_trip_and_digest():
    c = SorterTrainConfig.from_dict(TINY)
    assert c.seq_len == (12,) and c.eval_lengths == (12,)
    again = SorterTrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.digest() == c.digest()
    assert c.replace(eval_every=1, device="cuda").digest() == c.digest()   # runtime only
    assert c.replace(target_strength=0.1).digest() != c.digest()
    assert SorterTrainConfig(kind="gru").validation_lengths == (8, 32, 128)
    assert SorterTrainConfig(kind="lstm", seq_len=16).validation_lengths == (16,)


@pytest.mark.parametrize(("changes", "match"), [
    ({"kind": "transformer"}, "`kind` must be one of"),
    ({"kind": "lstm", "seq_len": [16, 32]}, "one length for an 'lstm'"),
    ({"seq_len": [1]}, "`seq_len` must be"),
    ({"sizes": {"width": 3}}, "got unknown width"),
    ({"sizes": {"hidden_size": 0}}, "`sizes.hidden_size` must be an integer >= 1"),
    ({"steps": 0}, "`steps` must be an integer >= 1"),
    ({"lr": -1.0}, "`lr` must be a positive number"),
    ({"loss": "huber"}, "`loss` must be one of"),
    ({"target_strength": math.nan}, "`target_strength` must be"),
    ({"fail_at_step": 2}, "`fail_marker` must name a file"),
    ({"batch": 3}, "unknown key"),
])
def test_config_validation(changes, match):
    with pytest.raises(InputError, match=match):
        SorterTrainConfig.from_dict({**TINY, **changes})


# --- the in-process loop ------------------------------------------------------------------------

@pytest.mark.slow
def test_in_process_loop_converges_on_a_tiny_budget():
    cfg = {**TINY, "seq_len": [16], "eval_lengths": [16], "steps": 30, "eval_every": 10,
           "batch_size": 32, "eval_rows": 8}
    result = train_sorter(cfg)
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [10, 20, 30]
    assert last["loss"] < 0.25 * first["loss"]
    assert last["val_rank_error"] < first["val_rank_error"]
    assert last["val_spearman"] > 0.99 and last["val_rank_error"] < 0.05
    assert not result.sorter.training
    card = result.card
    assert card["complete"] and card["steps"] == 30 and card["seed"] == 0
    assert card["validation"]["N16"]["spearman"] > 0.99
    assert 0 < card["validation"]["N16"]["grad_cosine"] <= 1


def test_training_is_reproducible_and_resume_is_exact(tmp_path):
    """A run killed after step 4 and resumed from its step-3 checkpoint ends bit-identical."""
    whole = train_sorter(TINY)
    marker = tmp_path / "failed.marker"
    cfg = {**TINY, "fail_at_step": 4, "fail_marker": str(marker)}
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train_sorter(cfg, checkpoint_dir=tmp_path / "ck")
    assert marker.is_file() and latest_state(tmp_path / "ck").name == "step-0000003"
    resumed = train_sorter(cfg, checkpoint_dir=tmp_path / "ck")        # the marker: no 2nd failure
    for a, b in zip(whole.sorter.state_dict().values(), resumed.sorter.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["step"] for h in resumed.history] == [3, 6]
    assert latest_state(tmp_path / "ck").name == "step-0000006"
    again = train_sorter(cfg, checkpoint_dir=tmp_path / "ck")          # finished: nothing to do
    assert again.card["complete"] and again.history == resumed.history
    for a, b in zip(again.sorter.state_dict().values(), resumed.sorter.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train_sorter(TINY, checkpoint_dir=tmp_path)
    with pytest.raises(InputError, match="another configuration"):
        train_sorter({**TINY, "lr": 5e-3}, checkpoint_dir=tmp_path)


def test_local_output_card_and_mismatched_seq_len_at_load(tmp_path):
    out = tmp_path / "lstm8.safetensors"
    cfg = {**TINY, "kind": "lstm", "seq_len": [8], "eval_lengths": [],
           "sizes": {"hidden_size": 4, "head_dim": 2}, "steps": 2}
    card = pretrain_sorter_local(cfg, out)
    assert not list(tmp_path.glob(".*checkpoints"))                    # default folder removed
    side = json.loads(out.with_suffix(".json").read_text())
    for key in ("kind", "seq_len", "convention", "steps", "seed", "validation"):
        assert side[key] == card[key]
    assert (side["kind"], side["seq_len"], side["convention"]) == ("lstm", 8, CONVENTION)
    assert side["steps"] == 2 and side["seed"] == 0 and set(side["validation"]) == {"N8"}
    assert load_sorter(out, seq_len=8).seq_len == 8
    with pytest.raises(SorterLengthError, match=r"trained for seq_len 8, got 16"):
        load_sorter(out, seq_len=16)
    with pytest.raises(SorterLengthError, match="accepts sequences of length 8 only"):
        SpearmanLoss(load_sorter(out))(torch.randn(16), torch.randn(16))


@pytest.mark.slow
def test_importing_the_training_modules_does_not_import_ray():
    code = ("import sys, rankcore.train.sorter, rankcore.train.sorter_ray, rankcore.sorters; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- Ray Train inside the Prefect flow ----------------------------------------------------------

@pytest.mark.ray
@pytest.mark.prefect
@pytest.mark.slow
def test_flow_two_ray_workers_with_a_killed_worker_resume_and_finish(
        prefect_server, ray_cluster, tmp_path):
    from flows.params import PretrainSorterParams
    from flows.pretrain_sorter import pretrain_sorter_flow
    from rankcore.train.sorter_ray import FAIL_MARKER

    out = tmp_path / "pw.safetensors"
    params = PretrainSorterParams(out=str(out), kind="pairwise", seq_len=12, steps=8,
                                  batch_size=16, workers=2, checkpoint_every=3, eval_every=3,
                                  max_failures=1, storage_path=str(tmp_path / "ray"),
                                  sizes={"hidden_size": 8}, eval_rows=4, fail_at_step=5)
    card = pretrain_sorter_flow(params)
    markers = list((tmp_path / "ray").glob(f"*/{FAIL_MARKER}"))
    assert len(markers) == 1                                   # the worker did fail once ...
    assert card["engine"] == "ray" and card["complete"]        # ... and the run still finished
    assert card["workers"] == 2 and card["global_batch_size"] == 32
    assert card["replicas_in_sync"] is True                    # DDP kept the weights identical
    assert [h["step"] for h in card["history"]] == [3, 6, 8]
    sorter = load_sorter(out)
    assert sorter.kind == "pairwise" and sorter.card["steps"] == 8
    assert {"N8", "N12", "N128"} == set(sorter.card["validation"])
    x = torch.randn(3, 12)
    assert sorter(x).shape == (3, 12)


@pytest.mark.prefect
def test_cli_local_engine_and_rerun_reuses_the_file(prefect_server, tmp_path, capsys):
    from flows.cli import main
    from flows.params import PretrainSorterParams
    from flows.pretrain_sorter import pretrain_sorter_flow

    out = tmp_path / "gru.safetensors"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sizes": {"hidden_size": 4, "num_layers": 1},
                               "eval_every": 2, "target_strength": 0.1}))
    argv = ["pretrain-sorter", "--out", str(out), "--kind", "gru", "--seq-len", "8",
            "--steps", "2", "--batch-size", "8", "--seed", "3", "--config", str(cfg)]
    assert main(argv) == 0
    assert "sorter: " in capsys.readouterr().out
    card = load_sorter(out).card
    assert (card["kind"], card["seed"], card["steps"], card["engine"]) == ("gru", 3, 2, "local")
    assert card["target_strength"] == 0.1 and card["config"]["sizes"] == {"hidden_size": 4,
                                                                         "num_layers": 1}
    again = pretrain_sorter_flow(PretrainSorterParams(
        out=str(out), kind="gru", seq_len=8, steps=2, batch_size=8, seed=3, eval_every=2,
        target_strength=0.1, sizes={"hidden_size": 4, "num_layers": 1}))
    assert again["reused"] and again["weights_sha256"] == card["weights_sha256"]
    assert main([*argv[:-2], "--kind", "transformer"]) == 2


# --- evaluation measures ------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rank_error_and_spearman_match_scipy():
    x, target = SequenceSampler(5, 16, 8).batch(0)
    noisy = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    want_err = np.abs(noisy.numpy() - _scipy_sodeep(x.numpy())).mean(-1)
    np.testing.assert_allclose(rank_error(noisy, target).numpy(), want_err, rtol=1e-6)
    want_rho = [spearmanr(a, b).statistic for a, b in zip(noisy.numpy(), target.numpy())]
    np.testing.assert_allclose(rank_spearman(noisy, target).numpy(), want_rho, atol=1e-6)
    const = torch.full((1, 5), 0.6)
    assert torch.isnan(rank_spearman(torch.rand(1, 5), const)).all()     # undefined target
    assert rank_spearman(const, get_tiedrank(torch.rand(1, 5), dim=-1)).item() == 0.0


def test_surrogate_gradients_are_those_of_the_losses():
    gen = torch.Generator().manual_seed(0)
    y = 50 + 15 * torch.randn(4, 10, generator=gen, dtype=torch.float64)
    p = (y + 5 * torch.randn(4, 10, generator=gen, dtype=torch.float64)).requires_grad_(True)
    target = get_tiedrank(y, dim=-1)
    soft = soft_surrogate("pairwise", 0.2)
    (g1,) = torch.autograd.grad((soft.ranks(p) - target).square().mean(), p)
    (g2,) = torch.autograd.grad(SoftSpearmanLoss("pairwise", 0.2)(p, y), p)
    torch.testing.assert_close(g1, g2)
    sorter = build_sorter("pairwise", hidden_size=8).double()
    (g3,) = torch.autograd.grad((sorter_surrogate(sorter).ranks(p) - target).square().mean(), p)
    (g4,) = torch.autograd.grad(SpearmanLoss(sorter)(p, y), p)
    torch.testing.assert_close(g3, g4)


def test_gradient_agreement_separates_smooth_from_hard_steps():
    """A soft rank smoothed at the measure's resolution agrees; an almost hard step does not."""
    y = torch.cat([c.x[:8] for c in accuracy_suite((24,), rows=8) if c.ties])
    smooth, _ = gradient_agreement(soft_surrogate("pairwise", 0.05), y, samples=256)
    hard, _ = gradient_agreement(soft_surrogate("pairwise", 1e-4), y, samples=256)
    assert float(smooth.mean()) > 0.8
    assert float(hard.mean()) < 0.5 * float(smooth.mean())


def test_evaluate_surrogate_exact_reference_and_fixed_length_skip():
    suite = accuracy_suite((8, 16), rows=4)
    exact = summarize(evaluate_surrogate(exact_surrogate(), suite))
    assert exact["rank_error"] == 0 and exact["spearman"] == 1
    assert math.isnan(exact["grad_cosine"])
    lstm = build_sorter("lstm", seq_len=16, hidden_size=4, head_dim=2).eval()
    scores = evaluate_surrogate(sorter_surrogate(lstm), suite, grad_rows=2, fd_samples=16)
    assert scores and {s.seq_len for s in scores} == {16}
    assert all(np.isfinite(s.grad_cosine) for s in scores)
    with pytest.raises(InputError, match="has no gradient"):
        gradient_agreement(exact_surrogate(), suite[0].x)
    assert isinstance(soft_surrogate("pav", 1.0), Surrogate)
    with pytest.raises(InputError):
        soft_surrogate("pav", -1.0)


# --- shipped checkpoints ------------------------------------------------------------------------

#: (N, Spearman with exact ranks at least, mean |rank error|/N at most) on tied sequences.
SHIPPED_TARGETS = {
    "pairwise": [(32, 0.995, 0.01), (8, 0.99, 0.02), (128, 0.99, 0.012)],  # issue 4 targets
    "lstm16": [(16, 0.97, 0.025)],                # measured: 0.984 / 0.014
    "lstm32": [(32, 0.97, 0.03)],                 # measured: 0.984 / 0.018
    "lstm64": [(64, 0.96, 0.035)],                # measured: 0.980 / 0.020
}


def test_shipped_sorters_are_listed():
    assert set(SHIPPED_TARGETS) <= set(list_pretrained())
    with pytest.raises(InputError, match="shipped sorters"):
        load_pretrained("nope")
    with pytest.raises(SorterLengthError):
        load_pretrained("lstm16", seq_len=32)


@pytest.mark.parametrize("name", sorted(SHIPPED_TARGETS))
def test_shipped_sorter_accuracy_on_a_fresh_sample(name):
    sorter = load_pretrained(name)
    card = sorter.card
    for key in ("kind", "seq_len", "convention", "steps", "seed", "validation", "config"):
        assert key in card
    assert card["complete"] and card["convention"] == CONVENTION and card["engine"] == "local"
    path = Path(__file__).resolve().parents[1] / "rankcore/sorters/pretrained"
    assert (path / f"{name}.safetensors").stat().st_size < 1_000_000
    for n, min_rho, max_err in SHIPPED_TARGETS[name]:
        # a fresh sample: a seed used by neither training (0) nor validation (VAL_SEED)
        x, target = SequenceSampler(VAL_SEED + 1000 + n, n, 64, tie_prob=1.0).batch(0)
        with torch.no_grad():
            pred = sorter(x)
        rho = rank_spearman(pred, target)
        assert float(rho[~rho.isnan()].mean()) >= min_rho, (name, n)
        assert float(rank_error(pred, target).mean()) <= max_err, (name, n)
