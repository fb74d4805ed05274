"""A model you can share, through the real CLI: no participant id anywhere in MODEL_DIR (the
per-subject records go to MODEL_DIR.records), a card with intended use, training population
and library versions, `brainrank card` printing it, and evaluate still using the records."""

from __future__ import annotations

import json

import pytest
from _tiny_cohort import ingest_manifest, write_manifest

from flows.cli import main

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

N = 18
IDS = [f"sub-{i:02d}" for i in range(N)]


def _files_with_ids(folder) -> dict[str, list[str]]:
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits = [pid for pid in IDS if pid.encode() in data]
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


def test_model_folder_holds_no_participant_id_and_card_describes_the_model(
        prefect_server, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "cohort", N)
    cache, model = tmp_path / "cache", tmp_path / "model"
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"options": {"backbone": {"growth": [4, 4]}, "num_threads": 1}}))
    ingest_manifest(manifest, cache)
    assert main(["train", str(cache), "--out", str(model), "--epochs", "1", "--batch-size", "4",
                 "--rank-loss", "none", "--config", str(cfg)]) == 0
    assert main(["evaluate", str(model), str(cache), "--out", str(tmp_path / "report"),
                 "--n-boot", "0"]) == 0  # also stores bias.json in MODEL_DIR
    capsys.readouterr()

    assert (model / "bias.json").is_file()
    assert _files_with_ids(model) == {}
    records = tmp_path / "model.records"
    split = json.loads((records / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == N - json.loads(
        (model / "card.json").read_text())["split"]["test"]["n"]
    assert set(_files_with_ids(records)) >= {"split.json", "stage1/predictions.csv",
                                             "stage2/predictions.csv"}
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["bias_corrected"]["n_fit"] == len(split["val"])  # found through the records

    card = json.loads((model / "card.json").read_text())
    assert "Research use only" in card["intended_use"]
    pop = card["training_population"]
    assert pop["n"] == len(split["train"]) + len(split["val"])
    assert 20 <= pop["age_min"] < pop["age_max"] <= 80
    assert sum(pop["sex"].values()) == sum(pop["site"].values()) == pop["n"]
    assert set(pop["site"]) <= {"a", "b"} and set(pop["sex"]) <= {"F", "M"}
    for lib in ("torch", "numpy", "scipy", "nibabel", "pyarrow", "prefect", "ray",
                "safetensors"):
        assert card["versions"].get(lib), lib

    assert main(["card", str(model)]) == 0
    text = capsys.readouterr().out
    assert "Intended use" in text and "Research use only" in text
    assert f"subjects     {pop['n']}" in text and "scipy" in text and "site" in text
    assert main(["card", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card
    assert main(["card", str(tmp_path / "cohort")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("brainrank card: error: `model_dir` must be")
