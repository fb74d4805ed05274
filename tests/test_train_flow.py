"""The `train` Prefect flow and `brainrank train` on a tiny real cache: both stages, card and
curves in MODEL_DIR, per-epoch lines in the flow log, the progress artifact, reuse on rerun,
and one-line errors with exit code 2 for unusable input.

Runs against the session's temporary Prefect server (fixture ``prefect_server``).
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_cohort import make_cache
from prefect.artifacts import Artifact

from flows.cli import main
from flows.params import TrainParams
from flows.train import run_cli, train_flow
from rankcore.errors import InputError
from rankcore.train import SubjectData

pytestmark = pytest.mark.prefect

OPTIONS = {"lr": 3e-3, "backbone": {"growth": [4, 8]}, "num_threads": 1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch's first-use import here
    return make_cache(tmp_path_factory.mktemp("cohort"), 16)


def _params(cache, out, **kw) -> TrainParams:
    base = {"cache": str(cache), "out": str(out), "epochs": 2, "batch_size": 4, "k_folds": 2,
            "val_fraction": 0.2, "options": OPTIONS}
    base.update(kw)
    return TrainParams(**base)


def _server_log(flow_run_id) -> list[str]:
    """The messages the server holds for the flow run (after sending what is queued)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_train_flow_writes_both_stages_logs_epochs_and_reuses(prefect_server, cache, tmp_path):
    out = tmp_path / "model"
    state = train_flow(_params(cache, out), return_state=True)
    summary = state.result()
    json.dumps(summary)  # JSON-able
    assert not summary["reused"] and summary["model_dir"] == str(out.absolute())
    # on CPU stage 2 and cross-fitting are off by default: no fold jobs, stage 2 the identity
    assert set(summary["jobs"]) == {"stage1", "stage2"}
    assert summary["jobs"]["stage1"]["epochs_run"] == 2
    assert summary["jobs"]["stage2"]["epochs_run"] == 0
    for name in ("card.json", "training_curves.png", "stage1/model.safetensors",
                 "stage1/card.json", "stage2/model.safetensors", "stage2/card.json"):
        assert (out / name).is_file(), name
    card = json.loads((out / "card.json").read_text())
    assert card["data"]["digest"] == summary["data_digest"]
    assert card["config"]["epochs"] == 2 and card["config"]["rank_loss"] == "soft"
    assert card["metrics"] == summary["metrics"]
    # per-epoch lines with loss parts and validation MAE / SRCC reached the flow run's log on
    # the server (rankcore's logger is one of Prefect's extra loggers: tasks/_logs.py)
    epoch_lines = [m for m in _server_log(state.state_details.flow_run_id)
                   if " epoch " in m and "val MAE" in m]
    assert len(epoch_lines) == 2
    assert all("regression" in m and "rank" in m and "SRCC" in m for m in epoch_lines)
    progress = Artifact.get("train-progress")
    assert progress is not None and float(progress.data) == pytest.approx(100.0)
    report = Artifact.get("train-summary")
    assert report is not None and "validation, cascade" in report.data

    again = train_flow(_params(cache, out))
    assert again["reused"] and again["metrics"] == summary["metrics"]
    assert json.loads((out / "card.json").read_text()) == card


def test_cli_train_with_config_file_and_a_mismatching_rerun(prefect_server, cache, tmp_path,
                                                            capsys):
    out = tmp_path / "model"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps({"k-folds": 2, "batch-size": 4, "val_fraction": 0.2,
                               "options": OPTIONS}))
    argv = ["train", str(cache), "--out", str(out), "--epochs", "1", "--rank-loss", "none",
            "--config", str(cfg)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "trained cascade" in stdout and "validation cascade: MAE" in stdout
    card = json.loads((out / "card.json").read_text())
    assert card["config"]["rank_loss"] == "none" and card["k_folds"] == 2
    assert main(argv) == 0
    assert "reused cascade" in capsys.readouterr().out
    assert main([*argv[:-2], "--seed", "1", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another config (seed)" in err[0]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(prefect_server, tmp_path, capsys):
    from rankcore.sorters import build_sorter, save_sorter

    lstm = tmp_path / "lstm12.safetensors"
    save_sorter(lstm, build_sorter("lstm", seq_len=12), {})
    cases = [
        (make_cache(tmp_path / "empty", 0, corrupt=1), {}, "holds no subjects"),
        (make_cache(tmp_path / "few", 3), {"val_fraction": 0.0}, "fewer than one batch"),
        (make_cache(tmp_path / "no_ages", 6, ages=[None] * 6), {}, "has no ages"),
        (make_cache(tmp_path / "ok", 10), {"sorter": str(lstm)}, "fixed length"),
    ]
    for i, (cache_dir, kw, fragment) in enumerate(cases):
        out = tmp_path / f"model-{i}"
        assert run_cli(_params(cache_dir, out, **kw)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("brainrank train: error: "), err
        assert fragment in err[0]
        assert not out.exists() and not list(tmp_path.glob(f"model-{i}.tmp-*"))
    with pytest.raises(InputError, match="`sorter`"):
        from flows import _config

        _config.build_params(TrainParams, {"cache": "c", "out": "o", "rank_loss": "soft",
                                           "sorter": "x.safetensors"})


def test_nan_loss_exits_2_and_keeps_the_last_good_checkpoint(prefect_server, cache, tmp_path,
                                                              capsys, monkeypatch):
    original = SubjectData.batch

    def batch(self, indices, device="cpu", model=None):
        out = original(self, indices, device, model)
        if list(tmp_path.glob("model.tmp-*/stage1/latest.json")):
            # NaN images from the first batch after stage 1's first epoch checkpoint on
            out["image"] = torch.full_like(out["image"], float("nan"))
        return out

    monkeypatch.setattr(SubjectData, "batch", batch)
    out = tmp_path / "model"
    assert run_cli(_params(cache, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("brainrank train")]
    assert len(err) == 1 and "became NaN or inf at epoch 2" in err[0], err
    assert "epoch-0000" in err[0] and err[0].count("stage1") >= 1
    assert not out.exists()
    (staging,) = tmp_path.glob("model.tmp-*")
    assert (staging / "stage1" / "latest.json").is_file()


def test_job_tasks_retry_other_errors_but_not_ours():
    from prefect.states import Failed

    from rankcore.errors import TrainingError
    from tasks.train import _retry_unless_our_error

    assert not _retry_unless_our_error(None, None, Failed(data=TrainingError("NaN")))
    assert not _retry_unless_our_error(None, None, Failed(data=InputError("bad")))
    assert _retry_unless_our_error(None, None, Failed(data=RuntimeError("worker died")))


@pytest.mark.slow
def test_process_pool_jobs_give_the_sequential_model(prefect_server, cache, tmp_path):
    from safetensors.torch import load_file

    one = train_flow(_params(cache, tmp_path / "one", epochs=1))
    two = train_flow(_params(cache, tmp_path / "two", epochs=1, workers=2))
    assert two["training_key"] == one["training_key"] and two["metrics"] == one["metrics"]
    for part in ("stage1", "stage2"):
        a = load_file(str(tmp_path / "one" / part / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / part / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(Artifact.get("train-progress").data) == pytest.approx(100.0)
