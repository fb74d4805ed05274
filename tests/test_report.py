"""The evaluation report's pieces: metrics (against scipy/numpy), bias fitting on validation
only, the predictions table, plots and the self-contained HTML."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats

from rankcore.bias import fit_bias_correction
from rankcore.errors import InputError
from rankcore.report import (
    PREDICTION_COLUMNS,
    Figure,
    build_metrics,
    metric_block,
    plot_gap_vs_age,
    plot_pred_vs_age,
    plot_site_boxes,
    predictions_table,
    render_html,
    render_markdown,
    report_blocks,
    write_table,
)
from rankcore.report.floor import simulated_floor
from rankcore.report.render import metrics_rows

# Fixed arrays with tied ages AND tied predictions (SRCC must use average ranks).
AGE = np.array([25.0, 31.0, 31.0, 40.0, 47.0, 47.0, 47.0, 55.0, 62.0, 70.0, 70.0, 78.0])
PRED = np.array([30.0, 33.5, 29.0, 41.0, 45.0, 50.5, 45.0, 52.0, 58.0, 63.0, 66.5, 69.0])
SITE = ["b", "a", "b", "a", "a", "b", "a", "b", "a", "b", "a", "b"]


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    return 0.75 * age + 12.0 + rng.normal(0, 4, n), age


def test_metric_block_equals_scipy_and_numpy():
    m = metric_block(PRED, AGE, n_boot=0)
    err = PRED - AGE
    assert m["n"] == len(AGE)
    assert m["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
    assert m["pearson_r"] == pytest.approx(scipy.stats.pearsonr(PRED, AGE).statistic, rel=1e-12)
    assert m["srcc"] == pytest.approx(scipy.stats.spearmanr(PRED, AGE).statistic, rel=1e-12)
    ss_tot = np.sum((AGE - AGE.mean()) ** 2)
    assert m["r2"] == pytest.approx(1 - np.sum(err**2) / ss_tot, rel=1e-12)
    assert m["mean_bias"] == pytest.approx(err.mean(), rel=1e-12)
    assert m["gap_age_corr"] == pytest.approx(scipy.stats.pearsonr(err, AGE).statistic,
                                              rel=1e-12)
    assert m["ci"]["mae"] == [None, None]


def test_metric_block_intervals_bracket_the_estimate_and_skip_unknown_ages():
    age = AGE.copy()
    age[[0, 5]] = np.nan
    m = metric_block(PRED, age, n_boot=400, seed=1)
    known = np.isfinite(age)
    assert m["n"] == int(known.sum())
    assert m["mae"] == pytest.approx(np.mean(np.abs(PRED[known] - age[known])))
    for name in ("mae", "rmse", "srcc", "pearson_r", "mean_bias"):
        low, high = m["ci"][name]
        assert low <= m[name] <= high, name
    assert m["ci"]["level"] == 0.95 and m["ci"]["n_boot"] == 400


def test_undefined_values_become_none_and_json_stays_standard():
    m = metric_block([40.0, 41.0], [50.0, 50.0], n_boot=20)  # constant age: r, r2 undefined
    assert m["pearson_r"] is None and m["r2"] is None and m["srcc"] is None
    assert m["mae"] == pytest.approx(9.5)
    json.dumps(m, allow_nan=False)
    empty = metric_block([40.0], [np.nan], n_boot=20)
    assert empty["n"] == 0 and empty["mae"] is None


def test_bias_correction_is_fitted_on_validation_only():
    val_pred, val_age = _data(30, seed=1)
    test_pred, test_age = _data(40, seed=2)
    s1 = test_pred + 1.0
    sites = ["s"] * 40
    first = build_metrics(test_pred, s1, test_age, sites, val_pred=val_pred, val_age=val_age,
                          n_boot=50)
    coef = first["bias_corrected"]["coefficients"]
    assert coef == fit_bias_correction(val_pred, val_age).to_dict()
    # Changing, moving or shrinking the test data cannot change the coefficients ...
    rng = np.random.default_rng(9)
    for pred, age in [(test_pred + rng.normal(0, 5, 40), test_age),
                      (test_pred[::-1].copy(), test_age[::-1].copy()),
                      (test_pred[:10] * 0.3, test_age[:10] + 20.0)]:
        other = build_metrics(pred, pred, age, ["s"] * len(age), val_pred=val_pred,
                              val_age=val_age, n_boot=0)
        assert other["bias_corrected"]["coefficients"] == coef
    # ... while the validation data does.
    moved = build_metrics(test_pred, s1, test_age, sites, val_pred=val_pred + 3.0,
                          val_age=val_age, n_boot=0)
    assert moved["bias_corrected"]["coefficients"]["beta"] == pytest.approx(coef["beta"] + 3)
    # The corrected block scores the test predictions corrected with the val coefficients.
    expected = test_pred - (coef["alpha"] * test_age + coef["beta"])
    assert first["bias_corrected"]["beheshti"]["mae"] == pytest.approx(
        np.mean(np.abs(expected - test_age)))
    expected_cole = (test_pred - coef["b"]) / coef["a"]
    assert first["bias_corrected"]["cole"]["rmse"] == pytest.approx(
        np.sqrt(np.mean((expected_cole - test_age) ** 2)))


def test_build_metrics_blocks_side_by_side_and_per_site():
    s1 = PRED + np.linspace(-2, 2, len(PRED))
    m = build_metrics(PRED, s1, AGE, SITE, n_boot=100)
    assert m["stage1"]["mae"] == pytest.approx(np.mean(np.abs(s1 - AGE)))
    assert m["bias_corrected"] == {"available": False,
                                   "reason": "no validation predictions to fit it on"}
    assert sorted(m["per_site"]) == ["a", "b"]
    assert sum(b["n"] for b in m["per_site"].values()) == m["n"]
    a = np.array([s == "a" for s in SITE])
    assert m["per_site"]["a"]["srcc"] == pytest.approx(
        scipy.stats.spearmanr(PRED[a], AGE[a]).statistic)
    assert m["per_site"]["b"]["stage1_mae"] == pytest.approx(np.mean(np.abs(s1 - AGE)[~a]))
    json.dumps(m, allow_nan=False)
    rows = metrics_rows(m)
    assert rows[0]["metric"] == "srcc" and rows[0]["cascade"] == m["srcc"]


def test_predictions_table_csv_and_parquet(tmp_path):
    c = fit_bias_correction(*_data(30, seed=3))
    age = AGE.copy()
    age[1] = np.nan
    sessions = [None] * len(AGE)
    table = predictions_table([f"sub-{i}" for i in range(len(AGE))], sessions, SITE, age,
                              PRED - 1.0, PRED, correction=c, cole=True)
    assert tuple(table.column_names[:len(PREDICTION_COLUMNS)]) == PREDICTION_COLUMNS
    out = write_table(table, tmp_path / "p.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["participant_id"] for r in rows] == [f"sub-{i}" for i in range(len(AGE))]
    assert rows[1]["age"] == rows[1]["brain_age_gap"] == rows[1]["corrected_age"] == ""
    assert float(rows[0]["brain_age_gap"]) == pytest.approx(PRED[0] - AGE[0], abs=1e-6)
    assert float(rows[0]["corrected_age"]) == pytest.approx(
        c.apply(PRED[:1], AGE[:1])[0], abs=1e-6)
    assert float(rows[0]["corrected_age_cole"]) == pytest.approx((PRED[0] - c.b) / c.a, abs=1e-6)
    back = pq.read_table(write_table(table, tmp_path / "p.parquet"))
    assert back.equals(table)
    # Cole's corrected age needs no age: filled where the age is unknown, its gap is not.
    cole = predictions_table(["x", "y"], [None, None], [None, None], [np.nan, 50.0],
                             [40.0, 45.0], [41.0, 46.0], correction=c, method="cole")
    assert cole.column("corrected_age").null_count == 0
    assert cole.column("corrected_gap").to_pylist()[0] is None
    with pytest.raises(InputError, match=r"\.csv"):
        write_table(table, tmp_path / "p.xlsx")
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_report_files_and_self_contained_html(tmp_path):
    val_pred, val_age = _data(20, seed=4)
    s1 = PRED + 0.5
    m = build_metrics(PRED, s1, AGE, SITE, val_pred=val_pred, val_age=val_age, n_boot=100)
    m["floor"] = {"mae": 1.9, "n": 12, "cohort_mae": 2.0}
    c = fit_bias_correction(val_pred, val_age)
    gap = PRED - AGE
    corrected = c.apply(PRED, AGE) - AGE
    figures = [Figure("pred.png", "predicted vs age"), Figure("gap.png", "gap vs age"),
               Figure("site.png", "gap per site")]
    plot_pred_vs_age(AGE, PRED, tmp_path / "pred.png", stage1=s1)
    plot_gap_vs_age(AGE, gap, tmp_path / "gap.png", corrected_gap=corrected)
    plot_site_boxes(SITE, gap, tmp_path / "site.png")
    for f in figures:
        assert (tmp_path / f.file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blocks = report_blocks(m, figures, title="test report", facts=["model: x"])
    md = render_markdown(blocks)
    html = render_html(blocks, tmp_path)
    # SRCC first in the accuracy table, floor and both corrections reported.
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table_rows[1].startswith("| SRCC")
    assert "Irreducible floor" in md and "Beheshti/Smith" in md and "Cole" in md
    for f in figures:
        assert f"]({f.file})" in md
    assert_self_contained(html)
    assert html.count('src="data:image/png;base64,') == len(figures)


def assert_self_contained(html: str) -> None:
    """No external URL and every src/href an embedded data: URI (shared with the flow test)."""
    # the embedded images' base64 text may spell "http" by chance: look outside it
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", html).lower()
    assert "http" not in text
    assert "href=" not in text
    for ref in re.findall(r'src\s*=\s*["\']?([^"\'\s>]*)', html, flags=re.IGNORECASE):
        assert ref.startswith("data:"), ref
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html


def test_simulated_floor_reads_only_matching_subjects(tmp_path):
    root = tmp_path / "cohort"
    truth = root / "derivatives" / "simulation" / "truth.tsv"
    truth.parent.mkdir(parents=True)
    rows = [("sub-0", "40", "42.0", "n/a"), ("sub-1", "50", "47.0", "n/a"),
            ("sub-2", "89+", "90.0", "n/a"), ("sub-3", "30", "10.0", "truncated")]
    lines = ["participant_id\tage\tbrain_age\tcorruption\tpath"]
    for pid, age, brain, corruption in rows:
        image = root / pid / "anat" / f"{pid}_T1w.nii.gz"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"x")
        lines.append(f"{pid}\t{age}\t{brain}\t{corruption}\t{pid}/anat/{pid}_T1w.nii.gz")
    truth.write_text("\n".join(lines) + "\n")
    src = [str(root / p / "anat" / f"{p}_T1w.nii.gz") for p in ("sub-0", "sub-2")]
    floor = simulated_floor(src, ["sub-0", "sub-2"])
    assert floor["mae"] == pytest.approx((2.0 + 1.0) / 2) and floor["n"] == 2
    assert floor["cohort_mae"] == pytest.approx((2.0 + 3.0 + 1.0) / 3)
    assert simulated_floor([str(tmp_path / "elsewhere.nii")], ["sub-0"]) is None
