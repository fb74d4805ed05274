"""The `ingest` Prefect flow on a tiny real cohort: 4 NIfTI files and one corrupt file.

Runs against the session's temporary Prefect server (fixture ``prefect_server``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pyarrow.parquet as pq
import pytest
from prefect.artifacts import Artifact

from flows.ingest import ingest_flow, run_cli
from flows.params import IngestParams
from rankcore.cache import open_cache

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 48, 40)  # the whole simulated brain at 4 mm (tissue classification needs it)


def _write_head(path: Path, seed: int) -> None:
    """A simulated skull-stripped T1 head (4 mm), different for every seed."""
    from rankcore.mri.phantom import SimulationConfig, render_subject, sample_subject

    params = sample_subject(SimulationConfig(subjects=1, seed=seed, spacing=4.0,
                                             quirks=False), 0)
    img, _, _ = render_subject(params, spacing=4.0)
    nib.save(img, path)


@pytest.fixture()
def manifest(tmp_path) -> Path:
    """cohort.csv: sub-01..sub-04 good .nii.gz files, sub-05 a corrupt one."""
    root = tmp_path / "cohort"
    root.mkdir()
    rows = []
    for i in range(1, 5):
        _write_head(root / f"sub-{i:02d}.nii.gz", i)
        rows.append((f"sub-{i:02d}", f"sub-{i:02d}.nii.gz", str(20 + 10 * i),
                     "F" if i % 2 else "M", "train" if i < 4 else "test"))
    (root / "sub-05.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated gzip")
    rows.append(("sub-05", "sub-05.nii.gz", "70", "M", "test"))
    path = root / "cohort.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path", "age", "sex", "split"])
        w.writerows(rows)
    return path


def _params(manifest: Path, cache: Path, **kw) -> IngestParams:
    return IngestParams(cohort=str(manifest), cache=str(cache), spacing=4.0, shape=SHAPE, **kw)


def test_ingest_flow_fills_the_cache_and_a_rerun_reuses_everything(
        prefect_server, manifest, tmp_path):
    cache = tmp_path / "cache"
    summary = ingest_flow(_params(manifest, cache))
    json.dumps(summary)  # JSON-able
    assert (summary["total"], summary["ingested"], summary["reused"]) == (5, 4, 0)
    assert summary["quarantined"]["unreadable"] == 1 and summary["n_quarantined"] == 1
    assert summary["failed_fraction"] == pytest.approx(0.2)
    view = open_cache(cache)
    assert view.keys == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert view.table.column("age").to_pylist() == [30.0, 40.0, 50.0, 60.0]
    assert view.splits == ["test", "train"]
    assert view.read_volume(0).shape == SHAPE
    q = pq.read_table(summary["quarantine_path"]).to_pylist()
    assert [(r["participant_id"], r["category"]) for r in q] == [("sub-05", "unreadable")]
    assert q[0]["source"].endswith("sub-05.nii.gz") and q[0]["message"]
    artifact = Artifact.get("ingest-summary")
    assert artifact is not None and "| ingested | 4 |" in artifact.data
    assert "| quarantined: unreadable | 1 |" in artifact.data
    progress = Artifact.get("ingest-progress")  # updated batch by batch, full at the end
    assert progress is not None and float(progress.data) == pytest.approx(100.0)
    assert "5 of 5 subject(s)" in progress.description

    again = ingest_flow(_params(manifest, cache))
    assert (again["ingested"], again["reused"], again["n_quarantined"]) == (0, 4, 1)
    assert again["cache_path"] == summary["cache_path"]


def test_ingest_batch_size_is_the_library_default_unless_set(manifest, tmp_path):
    """IngestParams.batch_size None (the default) lets plan_ingest size the batches (up to 64,
    fewer so that each worker gets one); an explicit value is passed through."""
    from pydantic import ValidationError

    from flows.params import PipelineParams
    from rankcore.cache import CacheLayout, cache_lock
    from rankcore.mri import PreprocessConfig, read_cohort
    from tasks.ingest import plan_ingest_task

    assert _params(manifest, tmp_path).batch_size is None
    assert _params(manifest, tmp_path, batch_size=2).batch_size == 2
    with pytest.raises(ValidationError):
        _params(manifest, tmp_path, batch_size=0)
    pipe = PipelineParams(out=str(tmp_path / "run"), ingest={"batch_size": 3})
    assert pipe.ingest_params(str(manifest), str(tmp_path)).batch_size == 3
    assert PipelineParams(out="r").ingest_params("c", "d").batch_size is None

    cohort = read_cohort(manifest)  # 5 rows, all to process
    config = PreprocessConfig(spacing=4.0, shape=SHAPE)
    cache = tmp_path / "cache"
    with cache_lock(CacheLayout.for_config(cache, config)):
        sizes = {args: [len(b.subjects) for b in plan_ingest_task.fn(
            cohort, str(cache), config, *args).batches]
            for args in [(), (None, 2), (2,), (2, 4)]}
    assert sizes == {(): [5], (None, 2): [3, 2], (2,): [2, 2, 1], (2, 4): [2, 2, 1]}


def test_run_cli_exit_code_follows_max_failed_fraction(prefect_server, manifest, tmp_path,
                                                       capsys):
    cache = tmp_path / "cache"
    assert run_cli(_params(manifest, cache, max_failed_fraction=0.5)) == 0
    out, err = capsys.readouterr()
    assert "ingested 4, reused 0, quarantined 1 of 5" in out
    assert "quarantined by category: unreadable 1" in out and "error" not in err
    assert run_cli(_params(manifest, cache, max_failed_fraction=0.1)) == 3
    out, err = capsys.readouterr()
    assert "ingested 0, reused 4, quarantined 1 of 5" in out  # the summary is printed too
    err_lines = [line for line in err.splitlines() if line.startswith("brainrank ingest")]
    assert len(err_lines) == 1 and "--max-failed-fraction 0.1" in err_lines[0]


@pytest.mark.slow
def test_process_pool_workers_give_the_same_cache(prefect_server, manifest, tmp_path):
    one = ingest_flow(_params(manifest, tmp_path / "one"))
    two = ingest_flow(_params(manifest, tmp_path / "two", workers=2))
    assert (one["ingested"], two["ingested"]) == (4, 4)
    assert open_cache(tmp_path / "one").table.equals(open_cache(tmp_path / "two").table)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_inside_the_flow_matches_local(prefect_server, ray_cluster, manifest,
                                                  tmp_path):
    local = ingest_flow(_params(manifest, tmp_path / "local"))
    remote = ingest_flow(_params(manifest, tmp_path / "ray", engine="ray", workers=2))
    for key in ("total", "ingested", "reused", "quarantined", "failed_fraction"):
        assert local[key] == remote[key]
    assert open_cache(tmp_path / "local").table.equals(open_cache(tmp_path / "ray").table)


@pytest.mark.slow
def test_python_m_flows_ingest_runs_the_cli(prefect_server, manifest, tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "flows.ingest", str(manifest), "--cache", str(cache),
           "--spacing", "4", "--shape", *map(str, SHAPE)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ingested 4, reused 0, quarantined 1 of 5" in done.stdout
    failing = subprocess.run([*cmd, "--max-failed-fraction", "0.1"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert failing.returncode == 3 and "reused 4" in failing.stdout
    assert "--max-failed-fraction" in failing.stderr
