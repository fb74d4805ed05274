"""ingest → `brainrank train` → `brainrank evaluate` with no split column: train holds out a
test split by the pipeline's stable hash, records it in the card, and evaluate scores exactly
those unseen subjects; a split column is kept; without a test split evaluate refuses and says
what to do.

Train and evaluate run through the real CLI, on real NIfTI files ingested into a real Parquet
cache (with the tissue step off: the box phantoms have no tissue to classify, so the cache is
written with rankcore's ingest, the function `brainrank ingest` runs) and the session's
temporary Prefect server.
"""

from __future__ import annotations

import csv
import json

import pytest
from _tiny_cohort import ingest_manifest, write_manifest

from flows.cli import main
from rankcore.mri.holdout import held_out_participants

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

TRAIN = ["--epochs", "1", "--batch-size", "4", "--rank-loss", "none"]
OPTIONS = {"options": {"backbone": {"growth": [4, 4]}, "num_threads": 1}}


def _ids(path) -> list[str]:
    with open(path, newline="") as fh:
        return sorted(r["participant_id"] for r in csv.DictReader(fh))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "train.json"
    cfg.write_text(json.dumps(OPTIONS))
    return str(cfg)


def test_ingest_train_evaluate_without_a_split_column(prefect_server, tmp_path, config, capsys):
    manifest = write_manifest(tmp_path / "cohort", 20)
    cache, model, report = tmp_path / "cache", tmp_path / "model", tmp_path / "report"
    ingest_manifest(manifest, cache)
    assert main(["train", str(cache), "--out", str(model), *TRAIN, "--config", config]) == 0
    out = capsys.readouterr().out
    expected = sorted(held_out_participants([f"sub-{i:02d}" for i in range(20)], 0.2, 0))
    assert len(expected) >= 2
    assert f"held out {len(expected)} test subject(s)" in out

    card = json.loads((model / "card.json").read_text())
    assert card["split"]["test"] == {"source": "held_out", "fraction": 0.2, "seed": 0,
                                     "n": len(expected), "participants": len(expected)}
    assert card["data"]["n_train"] + card["data"]["n_val"] == 20 - len(expected)

    assert main(["evaluate", str(model), str(cache), "--out", str(report), "--n-boot", "0"]) == 0
    assert _ids(report / "predictions.csv") == expected
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == len(expected) and metrics["overlap_with_training"] == 0

    # The calibrated interval: stored at train time, applied and scored on the test split.
    assert card["interval"]["level"] == 0.9
    assert card["interval"]["n_calibration"] == card["data"]["n_val"]
    iv = metrics["interval"]
    assert iv["level"] == 0.9 and iv["n"] == len(expected) and 0 <= iv["coverage"] <= 1
    with open(report / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    inside = [float(r["interval_low"]) <= float(r["age"]) <= float(r["interval_high"])
              for r in rows]
    assert iv["coverage"] == pytest.approx(sum(inside) / len(rows))
    assert all(float(r["interval_low"]) < float(r["predicted_age"]) < float(r["interval_high"])
               for r in rows)
    assert "Prediction interval" in (report / "report.html").read_text()

    # Another split seed holds out other participants (and is another model).
    assert main(["train", str(cache), "--out", str(tmp_path / "m1"), *TRAIN, "--split-seed",
                 "1", "--config", config]) == 0
    card1 = json.loads((tmp_path / "m1" / "card.json").read_text())
    assert card1["split"]["test"]["seed"] == 1
    assert card1["training_key"] != card["training_key"]


def test_a_split_column_is_kept_and_no_test_split_is_refused_with_advice(
        prefect_server, tmp_path, config, capsys):
    splits = ["test" if i < 5 else "val" if i < 8 else "train" for i in range(20)]
    manifest = write_manifest(tmp_path / "cohort", 20, splits=splits)
    cache = tmp_path / "cache"
    ingest_manifest(manifest, cache)
    assert main(["train", str(cache), "--out", str(tmp_path / "model"), *TRAIN,
                 "--config", config]) == 0
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["split"]["test"] == {"source": "cache", "n": 5}
    assert card["split"]["source"] == "cache" and card["data"]["n_val"] == 3
    assert main(["evaluate", str(tmp_path / "model"), str(cache), "--out",
                 str(tmp_path / "report"), "--n-boot", "0"]) == 0
    assert _ids(tmp_path / "report" / "predictions.csv") == [f"sub-{i:02d}" for i in range(5)]

    bare = write_manifest(tmp_path / "bare", 12)
    ingest_manifest(bare, tmp_path / "c2")
    assert main(["train", str(tmp_path / "c2"), "--out", str(tmp_path / "all"), *TRAIN,
                 "--test-fraction", "0", "--config", config]) == 0
    assert "no test split" in capsys.readouterr().out
    code = main(["evaluate", str(tmp_path / "all"), str(tmp_path / "c2"), "--out",
                 str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "`split` must be one of" in err[0] and "--split all" in err[0]
    assert "brainrank train" in err[0]
