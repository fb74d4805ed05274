"""`brainrank evaluate` and `brainrank predict` through the real flows and a real Prefect server.

One tiny cascade (1 epoch, a 2-block backbone) is trained once per module (given file:// URIs)
on a simulated cohort of 12 subjects (+1 broken file) cached at 6 mm on a (16, 20, 16) grid;
the splits come from a manifest: 6 train, 2 val, 4 test.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.evaluate import evaluate_flow
from flows.params import EvaluateParams
from rankcore._sealed import seal
from rankcore.bias import BiasCorrection, fit_bias_correction
from rankcore.cache import ingest_cohort, open_cache
from rankcore.mri import PreprocessConfig, read_cohort
from rankcore.mri.simulate import TRUTH_RELPATH, simulate_cohort
from rankcore.train.cascade import train_cascade

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

PREPROCESS = PreprocessConfig(spacing=6.0, shape=(16, 20, 16))
TINY = {"epochs": 1, "batch_size": 2, "amp": False, "num_threads": 1,
        "backbone": {"input_pool": 1, "stem_channels": 4, "stem_stride": 1, "growth": [4, 4]}}
PNGS = ("pred_vs_age.png", "gap_vs_age.png", "site_gap.png", "training_curves.png")


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Simulated cohort -> manifest with splits -> cache -> 1-epoch cascade."""
    base = tmp_path_factory.mktemp("evaluate_predict")
    root = simulate_cohort(base / "cohort", subjects=12, seed=1, spacing=4.0, sites=2,
                           corrupt=1)
    truth = _rows(root / TRUTH_RELPATH, "\t")
    valid = sorted(r["participant_id"] for r in truth if r["corruption"] == "n/a")
    split = {pid: "test" if i % 3 == 0 else "val" if i in (1, 7) else "train"
             for i, pid in enumerate(valid)}
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path", "age", "sex", "site", "split"])
        for r in truth:  # the broken file too: ingest quarantines it
            w.writerow([r["participant_id"], r["path"], r["age"], r["sex"], r["site"],
                        split.get(r["participant_id"], "train")])
    cache = base / "cache"
    ingest_cohort(read_cohort(root / "manifest.csv"), cache, PREPROCESS)
    model = base / "model"
    train_cascade(cache.as_uri(), model.as_uri(), TINY, k_folds=2)  # file:// URIs are paths
    return {"base": base, "root": root, "cache": cache, "model": model}


@pytest.fixture(scope="module")
def evaluated(trained, prefect_server) -> dict:
    out = trained["base"] / "report"
    result = evaluate_flow(EvaluateParams(model_dir=str(trained["model"]),
                                          cache=str(trained["cache"]), out=str(out),
                                          n_boot=200))
    return {"out": out, "result": result}


def _assert_self_contained(html: str) -> None:
    # the embedded images' base64 text may spell "http" by chance: look outside it
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", html).lower()
    assert "http" not in text and "href=" not in text
    refs = re.findall(r'src\s*=\s*["\']?([^"\'\s>]*)', html, flags=re.IGNORECASE)
    assert refs and all(ref.startswith("data:image/png;base64,") for ref in refs)


def test_evaluate_flow_writes_a_complete_report(trained, evaluated):
    out, result = evaluated["out"], evaluated["result"]
    for name in ("metrics.json", "predictions.csv", "bias.json", "report.md", "report.html",
                 *PNGS):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result["metrics"]
    for key in ("n", "mae", "rmse", "pearson_r", "srcc", "r2", "mean_bias", "gap_age_corr",
                "stage1", "bias_corrected", "per_site", "ci", "floor"):
        assert key in metrics, key

    # Every test subject predicted exactly once: no padding, no duplicate, nobody missing.
    test_keys = open_cache(trained["cache"], PREPROCESS).select("test").keys
    rows = _rows(out / "predictions.csv")
    assert sorted(r["participant_id"] for r in rows) == sorted(test_keys)
    assert metrics["n"] == len(test_keys) == 4
    assert metrics["floor"]["n"] == 4 and metrics["floor"]["mae"] > 0
    r = rows[0]
    assert float(r["brain_age_gap"]) == pytest.approx(
        float(r["predicted_age"]) - float(r["age"]), abs=1e-5)
    _assert_self_contained((out / "report.html").read_text())

    # The correction comes from the validation subjects only: the same as a fit on the
    # validation predictions training itself wrote, and it is stored for `predict`.
    bc = metrics["bias_corrected"]
    assert bc["available"] and bc["n_fit"] == 2
    val = _rows(trained["base"] / "model.records" / "stage2" / "predictions.csv")
    ages = dict(zip(open_cache(trained["cache"], PREPROCESS).keys,
                    open_cache(trained["cache"], PREPROCESS).table.column("age").to_pylist()))
    ref = fit_bias_correction([float(v["cascade"]) for v in val], [ages[v["key"]] for v in val])
    stored = BiasCorrection.from_dict(json.loads((trained["model"] / "bias.json").read_text()))
    assert stored.alpha == pytest.approx(ref.alpha, abs=1e-4)
    assert stored.beta == pytest.approx(ref.beta, abs=1e-3)
    assert bc["coefficients"] == stored.to_dict()


def test_evaluate_flow_publishes_markdown_and_table_artifacts(evaluated):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["evaluation-report", "evaluation-metrics"])))
    kinds = {a.key: a.type for a in found}
    assert kinds == {"evaluation-report": "markdown", "evaluation-metrics": "table"}


def test_evaluate_cli_refuses_unknown_split_and_preprocessing_mismatch(trained, tmp_path,
                                                                      capsys):
    args = ["evaluate", str(trained["model"]), str(trained["cache"]), "--out",
            str(tmp_path / "r")]
    assert main([*args, "--split", "nope"]) == 2
    assert "`split` must be one of" in capsys.readouterr().err
    other = tmp_path / "cache4"  # the same cohort cached at 4 mm: not what the model takes
    ingest_cohort(read_cohort(trained["root"] / "manifest.csv"), other,
                  PreprocessConfig(spacing=4.0, shape=(16, 20, 16)))
    assert main(["evaluate", str(trained["model"]), str(other), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "model/cohort mismatch" in err and "spacing 6 mm" in err and "spacing 4 mm" in err
    assert not (tmp_path / "r").exists()


def test_predict_keeps_valid_subjects_of_a_cohort_with_a_bad_file(trained, evaluated,
                                                                  tmp_path, capsys):
    out = tmp_path / "preds.parquet"
    code = main(["predict", str(trained["model"]), str(trained["root"]), "--out", str(out),
                 "--bias-correct"])
    assert code == 0, capsys.readouterr().err
    rows = pq.read_table(out).to_pylist()
    table = [r for r in rows if r["status"] == "predicted"]
    assert len(table) == 12  # every valid subject of the BIDS root, the broken one set aside
    quarantine = _rows(tmp_path / "preds.quarantine.csv")
    assert [q["participant_id"] for q in quarantine] == ["sub-broken01"]
    assert quarantine[0]["category"] and quarantine[0]["message"]
    # the table itself says who was set aside and why
    aside = [r for r in rows if r["status"] != "predicted"]
    assert [(r["participant_id"], r["status"], r["reason"]) for r in aside] == \
        [("sub-broken01", quarantine[0]["category"], quarantine[0]["message"])]
    assert aside[0]["predicted_age"] is None
    assert (tmp_path / "preds.cache").is_dir()  # the default cache, next to the output
    assert all(r["corrected_age"] is not None for r in table)
    # The same model and preprocessing give the evaluation's numbers for the test subjects.
    evaluated_rows = {r["participant_id"]: r for r in _rows(evaluated["out"] / "predictions.csv")}
    by_id = {r["participant_id"]: r for r in table}
    for pid, r in evaluated_rows.items():
        assert by_id[pid]["predicted_age"] == pytest.approx(float(r["predicted_age"]), abs=1e-4)
        assert by_id[pid]["corrected_age"] == pytest.approx(float(r["corrected_age"]), abs=1e-4)


def test_predict_refuses_a_spacing_the_model_was_not_trained_for(trained, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained["model"]), str(trained["root"]), "--out", str(out),
                 "--spacing", "4"]) == 2
    err = capsys.readouterr().err
    assert "model/cohort mismatch" in err and "spacing 6 mm" in err
    assert not out.exists() and not (tmp_path / "preds.cache").exists()

    # Images far coarser than the model's grid are set aside; with none left, the run fails.
    src = next(p for p in sorted(trained["root"].glob("sub-0*/anat/*_T1w.nii*")))
    img = nib.load(src)
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32),
                             img.affine @ np.diag([4.0, 4.0, 4.0, 1.0])),
             coarse / "sub-c_T1w.nii.gz")
    (coarse / "manifest.csv").write_text("participant_id,path\nsub-c,sub-c_T1w.nii.gz\n")
    assert main(["predict", str(trained["model"]), str(coarse / "manifest.csv"), "--out",
                 str(out)]) == 2
    assert "model/cohort mismatch" in capsys.readouterr().err
    assert _rows(tmp_path / "preds.quarantine.csv")[0]["category"] == "spacing_mismatch"


def test_predict_csv_without_ages_and_without_a_stored_correction(trained, tmp_path, capsys):
    cohort = tmp_path / "noage"
    cohort.mkdir()
    images = sorted(trained["root"].glob("sub-0*/anat/*_T1w.nii*"))[:3]
    lines = ["participant_id,path"]
    for i, src in enumerate(images):
        shutil.copy(src, cohort / src.name)
        lines.append(f"sub-n{i},{src.name}")
    (cohort / "manifest.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "noage.csv"
    assert main(["predict", str(trained["model"]), str(cohort / "manifest.csv"), "--out",
                 str(out)]) == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [r["participant_id"] for r in rows] == ["sub-n0", "sub-n1", "sub-n2"]
    assert all(r["age"] == "" and r["brain_age_gap"] == "" and float(r["predicted_age"]) > 0
               for r in rows)

    bare = tmp_path / "model-copy"  # the same model before any evaluation: no bias.json
    shutil.copytree(trained["model"], bare, ignore=shutil.ignore_patterns("bias.json"))
    assert main(["predict", str(bare), str(cohort / "manifest.csv"), "--out",
                 str(tmp_path / "x.csv"), "--bias-correct"]) == 2
    assert "brainrank evaluate" in capsys.readouterr().err
    assert main(["predict", str(bare), str(cohort / "manifest.csv"), "--out",
                 str(tmp_path / "x.xlsx")]) == 2
    assert ".parquet" in capsys.readouterr().err


def test_evaluate_on_other_data_fits_on_the_training_validation_subjects(trained, evaluated,
                                                                          tmp_path):
    from rankcore.report import evaluate_model

    # The same images without split labels: other data (digest), ids shared with training.
    # The validation subjects are taken from the training cache named in the card, not
    # from same-named subjects of the evaluated cache.
    cache = tmp_path / "cache"
    ingest_cohort(read_cohort(trained["root"]), cache, PREPROCESS)
    ev = evaluate_model(trained["model"], cache, tmp_path / "report", split="all", n_boot=0)
    reference = evaluated["result"]["metrics"]["bias_corrected"]["coefficients"]
    bc = ev.metrics["bias_corrected"]
    assert bc["source"].endswith(str(trained["cache"]))
    assert bc["coefficients"] == pytest.approx(reference)
    assert ev.metrics["n"] == 12 and ev.metrics["same_data_as_training"] is False

    # Without the training cache, the correction stored in MODEL_DIR is used.
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    card = json.loads((model / "card.json").read_text())
    card["data"]["cache_dir"] = str(tmp_path / "gone")
    (model / "card.json").write_text(json.dumps(seal(card)))  # a deliberate edit, re-sealed
    ev = evaluate_model(model, cache, tmp_path / "report", split="all", n_boot=0)
    bc = ev.metrics["bias_corrected"]
    assert bc["source"].startswith("stored in") and bc["coefficients"] == reference
    (model / "bias.json").unlink()
    ev = evaluate_model(model, cache, tmp_path / "report", split="all", n_boot=0,
                        store_bias=False)
    assert ev.metrics["bias_corrected"]["available"] is False
    assert not (model / "bias.json").exists()


def test_file_uris_reach_train_evaluate_and_predict_as_paths(trained, evaluated, tmp_path,
                                                             capsys):
    """The module's model was trained from file:// URIs; evaluate and predict take them too
    (percent-escapes decoded), and every folder they record is the plain path."""
    card = json.loads((trained["model"] / "card.json").read_text())
    assert card["data"]["cache_dir"] == str(trained["cache"])
    report = tmp_path / "my report"
    assert main(["evaluate", trained["model"].as_uri(), trained["cache"].as_uri(), "--out",
                 report.as_uri(), "--n-boot", "200", "--no-store-bias"]) == 0, \
        capsys.readouterr().err
    metrics = json.loads((report / "metrics.json").read_text())
    want = evaluated["result"]["metrics"]
    assert (metrics["n"], metrics["mae"], metrics["srcc"]) == (want["n"], want["mae"],
                                                               want["srcc"])
    assert metrics["cache_dir"] == str(trained["cache"].resolve())
    assert metrics["model_dir"] == str(trained["model"].resolve())
    preds = tmp_path / "my preds.csv"
    assert main(["predict", trained["model"].as_uri(), trained["root"].as_uri(), "--out",
                 preds.as_uri()]) == 0, capsys.readouterr().err
    rows = [r for r in _rows(preds) if r["status"] == "predicted"]
    assert len(rows) == 12 and (tmp_path / "my preds.cache").is_dir()
    assert not [p for p in tmp_path.rglob("*") if "file:" in str(p) or "%20" in str(p)]
