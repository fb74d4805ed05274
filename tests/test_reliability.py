"""The seven faults of "nothing silently wrong", each reproduced through the real CLI (real
Prefect server, real NIfTI files, real Parquet cache) and refused with one clear line.

One tiny cascade is trained once per module on 12 heads cached at 4 mm on (12, 14, 10).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from _faults import GRID, TRAIN_CONFIG, error_lines, run, write_config, write_manifest
from _tiny_cohort import make_cache

from flows.cli import main
from rankcore._lock import lock_path, run_lock
from rankcore._sealed import seal
from rankcore.cache import find_layout, open_cache
from rankcore.cache.layout import read_manifest
from rankcore.cache.layout import write_manifest as write_cache_manifest
from rankcore.errors import InputError
from rankcore.mri.grid import MAX_EXTENT_MM, check_output_grid
from rankcore.mri.types import PreprocessConfig
from rankcore.train.checkpoint import weights_preprocess

pytestmark = [pytest.mark.prefect, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, prefect_server):
    base = tmp_path_factory.mktemp("reliability")
    cache = make_cache(base, 12)
    manifest = write_manifest(base / "src", base / "cohort.csv")
    config = write_config(base / "train.yaml", TRAIN_CONFIG)
    model = base / "model"
    assert main(["train", str(cache), "--out", str(model), "--config", str(config)]) == 0
    return SimpleNamespace(base=base, cache=cache, manifest=manifest, config=config,
                           model=model)


def _one_error_line(capsys, *words: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def _incomplete_copy(cache: Path, dest: Path) -> Path:
    """The cache as a killed ingest leaves it: manifest `complete: false`."""
    shutil.copytree(cache, dest)
    layout = find_layout(dest)
    manifest = read_manifest(layout)
    manifest.complete = False
    write_cache_manifest(layout, manifest)
    return dest


# ---- 1. an incomplete cache ----------------------------------------------------------------

def test_train_and_evaluate_refuse_an_incomplete_cache(tiny, tmp_path, capsys):
    cache = _incomplete_copy(tiny.cache, tmp_path / "cache")
    out = tmp_path / "model"
    assert main(["train", str(cache), "--out", str(out), "--config", str(tiny.config)]) == 2
    _one_error_line(capsys, "incomplete", "complete: false", "brainrank ingest")
    assert not out.exists()
    assert main(["evaluate", str(tiny.model), str(cache), "--out", str(tmp_path / "r"),
                 "--split", "all", "--n-boot", "0"]) == 2
    _one_error_line(capsys, "incomplete", "brainrank ingest")
    assert not (tmp_path / "r").exists()
    # allowed explicitly, it trains, and says so on stderr
    assert main(["train", str(cache), "--out", str(out), "--config", str(tiny.config),
                 "--allow-incomplete-cache"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "incomplete" in err and "--allow-incomplete-cache" in err


# ---- 2. preprocessing bound to the weights -------------------------------------------------

def _edit_card_preprocess(model: Path, shape: tuple[int, int, int]) -> dict:
    """The issue's reproduction: another grid in card.json, its preprocess digest recomputed."""
    card = json.loads((model / "card.json").read_text())
    pre = {k: v for k, v in card["preprocess"].items() if k != "digest"}
    config = PreprocessConfig(**{**pre, "shape": shape})
    card["preprocess"] = dict(config.to_dict(), digest=config.digest())
    (model / "card.json").write_text(json.dumps(card))
    return card


def test_weights_carry_their_preprocessing(tiny):
    card = json.loads((tiny.model / "card.json").read_text())
    for job in ("stage1", "stage2"):
        config, digest = weights_preprocess(tiny.model / job / "model.safetensors")
        assert digest == card["preprocess"]["digest"] == find_layout(tiny.cache).digest
        assert config == {k: v for k, v in card["preprocess"].items() if k != "digest"}
    assert set(card["files_sha256"]) == {"stage1/model.safetensors", "stage1/card.json",
                                         "stage2/model.safetensors", "stage2/card.json"}


def test_a_model_of_a_tissue_off_cache_predicts_with_tissue_off(tiny, tmp_path, capsys):
    # The tiny cache was ingested without tissue measurement, and box phantoms fail it: a
    # prediction succeeds only if the new scans are preprocessed exactly as the card says.
    card = json.loads((tiny.model / "card.json").read_text())
    assert card["preprocess"]["tissue"] is False
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny.model), str(tiny.manifest), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    view = open_cache(tmp_path / "p.cache")
    assert view.config.tissue is False
    assert view.layout.digest == card["preprocess"]["digest"]
    assert len(view) == 12


def test_an_edited_card_is_refused_by_predict_and_evaluate(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny.model, model)
    card = _edit_card_preprocess(model, (16, 16, 12))
    args = ["predict", str(model), str(tiny.manifest), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 2
    _one_error_line(capsys, "card.json", "corrupt")
    # Even re-sealed (its checksum recomputed), the card disagrees with the weights' record.
    (model / "card.json").write_text(json.dumps(seal(card)))
    assert main(args) == 2
    _one_error_line(capsys, "does not belong to these weights", "[12, 14, 10]")
    assert main(["evaluate", str(model), str(tiny.cache), "--out", str(tmp_path / "r"),
                 "--split", "all"]) == 2
    _one_error_line(capsys, "does not belong to these weights")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r").exists()


def test_a_cache_of_another_grid_is_refused(tiny, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["ingest", str(tiny.manifest), "--cache", str(other), "--spacing", "4",
                 "--shape", "10", "12", "8", "--no-tissue"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tiny.model), str(other), "--out", str(tmp_path / "r"),
                 "--split", "all"]) == 2
    _one_error_line(capsys, "model/cohort mismatch", "(12, 14, 10)", "(10, 12, 8)")


def test_train_picks_the_cache_by_tissue_and_refuses_an_ambiguous_one(tiny, tmp_path, capsys):
    from rankcore.cache import choose_config

    cache = tmp_path / "cache"
    shutil.copytree(tiny.cache, cache)
    off = find_layout(cache)
    on = PreprocessConfig(**{**json.loads(off.config_path.read_text()), "tissue": True})
    on = PreprocessConfig(**{**on.to_dict(), "shape": tuple(on.shape)})
    shutil.copytree(off.folder, cache / on.digest())
    (cache / on.digest() / "config.json").write_text(json.dumps(on.to_dict()))
    assert choose_config(cache, 4.0, (12, 14, 10), False).digest() == off.digest
    assert choose_config(cache, 4.0, (12, 14, 10), True) == on
    with pytest.raises(InputError, match="`tissue` must be given") as err:
        choose_config(cache, 4.0, (12, 14, 10))
    assert off.digest in str(err.value) and on.digest() in str(err.value)
    args = ["train", str(cache), "--out", str(tmp_path / "m"), "--spacing", "4", "--shape",
            "12", "14", "10"]
    assert main(args) == 2
    _one_error_line(capsys, "`tissue` must be given", "tissue off", "tissue on")
    assert not (tmp_path / "m").exists()


# ---- 3. duplicate ids ----------------------------------------------------------------------

def test_conflicting_duplicates_go_to_quarantine_together(tiny, tmp_path, capsys):
    manifest = write_manifest(tiny.base / "src", tiny.base / "dups.csv", [
        ["sub-00", "src/sub-00_T1w.nii.gz", 77.0, "a"],   # conflicts with sub-00's age 20
        ["sub-01", "src/sub-01_T1w.nii.gz", 24.5, "b"],   # identical to sub-01's row
    ])
    cache = tmp_path / "cache"
    assert main(["ingest", str(manifest), "--cache", str(cache), *GRID]) == 0
    out = capsys.readouterr().out
    assert "duplicate_id 2" in out
    view = open_cache(cache)
    assert "sub-00" not in view.keys and view.keys.count("sub-01") == 1
    q = pq.read_table(view.layout.quarantine_path).to_pylist()
    dup = [r for r in q if r["category"] == "duplicate_id"]
    assert [r["participant_id"] for r in dup] == ["sub-00", "sub-00"]
    assert all("age 20.0 / 77.0" in r["message"] for r in dup)

    pred = tmp_path / "pred.csv"
    assert main(["predict", str(tiny.model), str(manifest), "--out", str(pred)]) == 0
    with pred.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    # sub-00 gets no prediction: its two conflicting rows are listed as set aside
    assert [r["status"] for r in table if r["participant_id"] == "sub-00"] == ["duplicate_id"] * 2
    assert all(r["predicted_age"] == "" for r in table if r["participant_id"] == "sub-00")
    assert [r["status"] for r in table if r["participant_id"] == "sub-01"] == ["predicted"]
    quarantine = (tmp_path / "pred.quarantine.csv").read_text().splitlines()
    assert sum(ln.startswith("sub-00,") and "duplicate_id" in ln for ln in quarantine) == 2


# ---- 4. one writer per output folder -------------------------------------------------------

def _hold_lock(target: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom rankcore._lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_folder_exits_2_naming_the_holder(tiny, tmp_path, capsys):
    report = tmp_path / "report"
    holder = _hold_lock(report)
    try:
        args = ["evaluate", str(tiny.model), str(tiny.cache), "--out", str(report),
                "--split", "all", "--n-boot", "0"]
        assert main(args) == 2
        line = _one_error_line(capsys, f"pid {holder.pid}", "started", "in use")
        assert os.uname().nodename in line
        assert main(["pipeline", "--out", str(report)]) == 2  # any writing command
        _one_error_line(capsys, f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died by kill -9: its lock file is stale and is taken over.
    assert lock_path(report).is_file()
    assert main(args) == 0
    assert not lock_path(report).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no stray files


def test_the_lock_is_reentrant_in_one_process_and_exclusive_between_processes(tmp_path):
    target = tmp_path / "out"
    with run_lock(target) as path, run_lock(target):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        code = ("import sys\nfrom rankcore._lock import run_lock\nfrom rankcore.errors import "
                "LockError\ntry:\n    with run_lock(sys.argv[1]): sys.exit(0)\n"
                "except LockError as e:\n    print(e); sys.exit(2)\n")
        r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert r.returncode == 2 and f"pid {os.getpid()}" in r.stdout
    assert not path.exists()


# ---- 5. one line, not tracebacks -----------------------------------------------------------

def test_a_non_utf8_config_is_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"epochs: 1\n# caf\xe9\n")
    assert main(["train", str(tiny.cache), "--out", str(tmp_path / "m"), "--config",
                 str(bad)]) == 2
    _one_error_line(capsys, "`--config` must be a UTF-8", "0xe9")


def test_bad_train_options_in_a_pipeline_config_fail_before_anything_runs(tmp_path, capsys):
    config = write_config(tmp_path / "p.yaml", {"train": {"options": {"lrr": 0.1}}})
    run_dir = tmp_path / "run"
    assert main(["pipeline", "--config", str(config), "--out", str(run_dir)]) == 2
    _one_error_line(capsys, "section `train`", "`options`", "lrr")
    assert not run_dir.exists()


def test_an_error_inside_a_flow_ends_in_one_line_without_traceback(tiny, api_url, tmp_path):
    from rankcore.cache.layout import CacheLayout, cache_lock

    config = PreprocessConfig(spacing=4.0, shape=(12, 14, 10), tissue=False)
    cache = tmp_path / "cache"
    with cache_lock(CacheLayout.for_config(cache, config)):  # another ingest is writing it
        code, _, err = run(["ingest", tiny.manifest, "--cache", cache, *GRID], api_url)
    assert code == 2
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) <= 3 and lines[-1].startswith("brainrank ingest: error: `cache_dir`")


# ---- 6. an upper bound on the output grid --------------------------------------------------

@pytest.mark.parametrize("shape, spacing, words", [
    ((640, 640, 640), 1.0, ("per subject", "got (640, 640, 640)")),
    ((100000, 100000, 100000), 2.0, ("per subject", "got (100000, 100000, 100000)")),
    ((300, 300, 300), 2.0, ("span at most 512 mm", "got (300, 300, 300)")),
])
def test_a_huge_grid_is_refused_before_any_work(tiny, tmp_path, capsys, shape, spacing, words):
    cache = tmp_path / "cache"
    args = ["--shape", *map(str, shape), "--spacing", str(spacing)]
    assert main(["ingest", str(tiny.manifest), "--cache", str(cache), *args]) == 2
    _one_error_line(capsys, "`shape` must", *words)
    assert main(["pipeline", "--out", str(tmp_path / "run"), *args]) == 2
    _one_error_line(capsys, "`shape` must", *words)
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_the_grid_bound_follows_available_memory():
    check_output_grid((80, 96, 80), 2.0, available=1 << 30)  # 7 MB of 256 MB: fine
    with pytest.raises(InputError,
                       match=r"`shape` must need at most 0\.0238 MiB .* at most 2,083 voxels"):
        check_output_grid((80, 96, 80), 2.0, available=100_000)
    with pytest.raises(InputError, match="span at most"):
        check_output_grid((10, 10, int(MAX_EXTENT_MM) + 1), 1.0)
    check_output_grid((10, 10, int(MAX_EXTENT_MM)), 1.0)


# ---- 7. no orphans -------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_child_started_with_die_with_parent_ends_with_its_parent(tmp_path):
    code = ("import os, subprocess, sys, time\nfrom flows._server import die_with_parent\n"
            "os.environ['BRAINRANK_PARENT_PID'] = str(os.getpid())\n"
            "p = subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent)\n"
            "print(p.pid, flush=True)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_the_reaper_ends_descendants_that_outlive_a_killed_parent():
    # Ray's raylet starts agents that survive their driver's kill -9; the reaper ends them.
    code = ("import subprocess, sys, time\nfrom rankcore._reaper import reap_descendants_on_death\n"
            "reap_descendants_on_death()\n"
            "mid = subprocess.Popen([sys.executable, '-c', 'import subprocess, time; p = "
            "subprocess.Popen([\"sleep\", \"300\"], start_new_session=True); print(p.pid, "
            "flush=True); time.sleep(300)'], stdout=subprocess.PIPE, text=True)\n"
            "print(mid.pid, mid.stdout.readline().strip(), flush=True)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = [int(p) for p in parent.stdout.readline().split()]
    time.sleep(1.5)  # the watchdog has seen them
    assert all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
