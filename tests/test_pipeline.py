"""The `pipeline` flow end to end on a tiny simulated cohort, under the session's Prefect server:
a cold run writes every stage's outputs, a corrupted file ends in quarantine (not in a failed
run), a warm rerun reuses every stage, and a changed option reruns its stage and the later
ones only. Also `brainrank pipeline` exit codes and the held-out split of a cohort without one.
"""

from __future__ import annotations

import copy
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml
from _tiny_pipeline import TINY

from flows.cli import main
from flows.params import PipelineParams
from flows.pipeline import pipeline_flow

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def _params(run_dir, **changes) -> PipelineParams:
    cfg = copy.deepcopy(TINY)
    for section, values in changes.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return PipelineParams(out=str(run_dir), **cfg)


def _statuses(result) -> dict[str, str]:
    return {name: rec["status"] for name, rec in result["stages"].items()}


@pytest.fixture(scope="module")
def cold(prefect_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    return run_dir, pipeline_flow(_params(run_dir))


def test_cold_run_writes_every_stage_and_evaluates_only_held_out_subjects(cold):
    run_dir, result = cold
    assert result["status"] == "succeeded"
    assert _statuses(result) == {"simulate": "ran", "ingest": "ran", "sorter": "skipped",
                                 "train": "ran", "evaluate": "ran"}
    for rel in ("cohort/participants.tsv", "cohort-split.csv", "model/card.json",
                "report/metrics.json", "report/predictions.csv", "report/report.html",
                "pipeline.json"):
        assert (run_dir / rel).is_file(), rel
    assert json.loads((run_dir / "pipeline.json").read_text()) == json.loads(json.dumps(result))

    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    card = json.loads((run_dir / "model" / "card.json").read_text())
    assert result["headline"]["mae"] == pytest.approx(metrics["mae"])
    assert result["headline"]["srcc"] == pytest.approx(metrics["srcc"], nan_ok=True)
    # the evaluated subjects are exactly the cached test rows, none of which trained
    cached = result["stages"]["ingest"]["summary"]["cache_splits"]
    assert metrics["n"] == cached["test"] >= 2
    record = json.loads((run_dir / "model.records" / "split.json").read_text())
    assert record["training_key"] == card["training_key"]
    trained = set(record["train"]) | set(record["val"])
    with open(run_dir / "report" / "predictions.csv") as fh:
        evaluated = {line.split(",")[0] for line in list(fh)[1:]}
    assert len(evaluated) == metrics["n"] and not evaluated & trained
    assert metrics["overlap_with_training"] == 0


def test_a_corrupted_file_is_quarantined_and_the_run_succeeds(cold):
    _, result = cold
    ingest = result["stages"]["ingest"]["summary"]
    assert ingest["n_quarantined"] == 1 and ingest["total"] == 17
    rows = pq.read_table(ingest["quarantine_path"]).to_pylist()
    assert [r["participant_id"] for r in rows] == ["sub-broken01"]
    assert rows[0]["category"] == "unreadable"
    assert result["stages"]["ingest"]["summary"]["pipeline_failed_fraction"] == \
        pytest.approx(1 / 17)


def test_warm_rerun_from_the_command_line_reuses_every_stage(cold, tmp_path, capsys):
    run_dir, first = cold
    card = run_dir / "model" / "card.json"
    before = (card.stat().st_mtime_ns, (run_dir / "report" / "metrics.json").stat().st_mtime_ns)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["pipeline", "--config", str(config), "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert _statuses(state) == {"simulate": "reused", "ingest": "reused", "sorter": "skipped",
                                "train": "reused", "evaluate": "reused"}
    assert state["seconds"] < 15  # seconds, not a retraining (a few on an idle machine)
    assert (card.stat().st_mtime_ns,
            (run_dir / "report" / "metrics.json").stat().st_mtime_ns) == before
    assert state["headline"] == first["headline"]
    assert f"report: {run_dir / 'report' / 'report.html'}" in out
    assert f"MAE {first['headline']['mae']:.3f} y" in out and "SRCC" in out


def test_changing_one_stage_reruns_it_and_the_later_stages_only(cold):
    run_dir, first = cold
    result = pipeline_flow(_params(run_dir, evaluate={"n_boot": 10}))
    assert _statuses(result) == {"simulate": "reused", "ingest": "reused", "sorter": "skipped",
                                 "train": "reused", "evaluate": "ran"}
    assert result["stages"]["train"]["output_digest"] == \
        first["stages"]["train"]["output_digest"]

    result = pipeline_flow(_params(run_dir, evaluate={"n_boot": 10}, train={"epochs": 2}))
    assert _statuses(result) == {"simulate": "reused", "ingest": "reused", "sorter": "skipped",
                                 "train": "ran", "evaluate": "ran"}
    card = json.loads((run_dir / "model" / "card.json").read_text())
    assert card["config"]["epochs"] == 2
    assert card["training_key"] != first["stages"]["train"]["output_digest"]
    # the replaced cascade is kept, one generation
    old = json.loads((run_dir / "previous" / "model" / "card.json").read_text())
    assert old["training_key"] == first["stages"]["train"]["output_digest"]
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["training_key"] == card["training_key"]


def test_a_pretrained_sorter_is_trained_once_and_feeds_the_cascade(cold):
    run_dir, _ = cold
    sorter = {"source": "pretrain", "pretrain": {
        "kind": "pairwise", "steps": 20, "seq_len": 4, "batch_size": 8, "eval_every": 1000,
        "checkpoint_every": 20, "eval_rows": 2}}
    result = pipeline_flow(_params(run_dir, sorter=sorter))
    assert _statuses(result) == {"simulate": "reused", "ingest": "reused", "sorter": "ran",
                                 "train": "ran", "evaluate": "ran"}
    sorter_file = run_dir / "sorter.safetensors"
    assert result["stages"]["sorter"]["outputs"]["sorter"] == str(sorter_file)
    card = json.loads((run_dir / "model" / "card.json").read_text())
    assert card["config"]["rank_loss"] == "sorter" and card["config"]["sorter"] == \
        str(sorter_file)
    again = pipeline_flow(_params(run_dir, sorter=sorter))
    assert _statuses(again) == {"simulate": "reused", "ingest": "reused", "sorter": "reused",
                                "train": "reused", "evaluate": "reused"}


def test_too_much_quarantine_stops_with_exit_code_3(cold, tmp_path, capsys):
    run_dir, _ = cold
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "max-failed-fraction": 0.01}))
    assert main(["pipeline", "--config", str(config), "--out", str(run_dir)]) == 3
    err = capsys.readouterr().err
    assert "quarantined, more than max_failed_fraction 0.01" in err
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["status"] == "failed" and state["error"]["stage"] == "ingest"
    assert state["error"]["kind"] == "quarantine_limit"


def test_unusable_cohort_exits_2_with_one_line(prefect_server, tmp_path, capsys):
    missing = tmp_path / "nowhere.csv"
    code = main(["pipeline", "--out", str(tmp_path / "run"), "--cohort", str(missing),
                 "--spacing", "6", "--shape", "16", "20", "16"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("brainrank pipeline: error: ") and "does not exist" in err
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert state["status"] == "failed" and state["error"]["stage"] == "ingest"


def test_out_must_be_empty_or_an_earlier_run(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    code = main(["pipeline", "--out", str(tmp_path / "busy")])
    assert code == 2
    assert "`out` must be an empty folder or an earlier pipeline run" in capsys.readouterr().err
    assert os.listdir(tmp_path / "busy") == ["thesis.tex"]
