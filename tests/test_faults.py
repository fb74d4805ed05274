"""Fault injection through the real `brainrank` command: kill -9 at a random point and rerun,
a flipped byte in every kind of file brainrank writes, concurrent runs on one folder, every
error path in at most three lines, no orphaned server.

Everything runs on one tiny pipeline (12 simulated heads, 8 mm on a 12 x 14 x 12 grid, one
epoch per job). Each test prints what the fault cost (``-s`` shows it); the README's
reliability table comes from these lines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _faults import (
    TRAIN_CONFIG,
    brainrank,
    cli_env,
    error_lines,
    flip_byte,
    flip_digit,
    volume_page_offset,
    write_config,
)

from flows.cli import main
from rankcore._lock import run_lock
from rankcore.cache import find_layout, open_cache
from rankcore.cache.layout import CacheLayout, cache_lock
from rankcore.mri.types import PreprocessConfig

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.usefixtures("one_torch_thread")]

#: A coarse partial-head grid: too small a field of view to measure tissue, so it is off.
GRID = {"spacing": 8.0, "shape": [12, 14, 12], "tissue": False}
GRID_ARGS = ["--spacing", "8", "--shape", "12", "14", "12", "--no-tissue"]
GRID_CONFIG = PreprocessConfig(spacing=8.0, shape=(12, 14, 12), tissue=False)
PIPELINE = {
    **GRID, "test_fraction": 0.25,
    "simulate": {"subjects": 12, "spacing": 4.0, "sites": 2},
    "sorter": {"source": "soft"},
    "train": {k: v for k, v in TRAIN_CONFIG.items() if k != "epochs"} | {"epochs": 1},
    "evaluate": {"n_boot": 0},
}
RNG = random.Random(int(os.environ.get("BRAINRANK_FAULT_SEED", time.time_ns() % 10_000)))


def _report(what: str, **numbers) -> None:
    # Past pytest's capture (capsys would swallow it): `pytest -s` shows these lines.
    print(f"\nFAULT {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()),
          file=sys.__stdout__, flush=True)


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_server):
    """One uninterrupted pipeline run: the reference result and the files to damage."""
    base = tmp_path_factory.mktemp("faults")
    config = write_config(base / "pipeline.yaml", PIPELINE)
    t0 = time.perf_counter()
    assert main(["pipeline", "--config", str(config), "--out", str(base / "run")]) == 0
    seconds = time.perf_counter() - t0
    state = json.loads((base / "run" / "pipeline.json").read_text())
    return {"base": base, "config": config, "dir": base / "run", "state": state,
            "seconds": seconds}


def _wait(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """Poll ``ready()`` until it holds (True) or ``proc`` ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("the fault point was never reached")


def _after(seconds: float):
    """A condition that holds ``seconds`` from now."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _strays(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".tmp") or p.name.endswith(".lock")
                  or ".tmp" in p.name)


def _cache_content(cache: Path) -> tuple:
    view = open_cache(cache, GRID_CONFIG, verify=True)
    vols = [view.read_volume(i).tobytes() for i in range(len(view))]
    return view.keys, view.table.to_pylist(), vols


def _weights(model: Path) -> dict:
    """The digest of each stage's tensors (the files' headers order metadata at random)."""
    from safetensors.torch import load_file

    from rankcore.train.checkpoint import weights_digest

    return {job: weights_digest(load_file(str(model / job / "model.safetensors")))
            for job in ("stage1", "stage2")}


def test_kill_ingest_at_a_random_point_then_rerun(run, api_url, tmp_path, capsys):
    manifest = run["dir"] / "cohort-split.csv"
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "ingest.yaml", {"batch_size": 1})  # a shard per subject
    args = ["ingest", manifest, "--cache", cache, *GRID_ARGS, "--allow-outside-root",
            "--config", config]
    n = len(_cache_content(run["dir"] / "cache")[0])
    k = RNG.randint(1, n - 2)
    proc = brainrank(args, api_url)
    shards = lambda: len(list(cache.glob("*/shards/*.parquet"))) >= k  # noqa: E731
    killed = _wait(proc, shards)
    _kill9(proc)
    capsys.readouterr()
    assert main(list(map(str, args))) == 0
    out = capsys.readouterr().out
    redone = int(out.split("ingested ")[1].split(",")[0])
    assert _cache_content(cache) == _cache_content(run["dir"] / "cache")
    assert _strays(tmp_path) == []
    _report("ingest kill -9", killed_after_shards=k if killed else "none (finished)",
            subjects=n, redone=redone)


def test_kill_train_at_a_random_point_a_concurrent_run_and_rerun(run, api_url, tmp_path, capsys):
    cache = run["dir"] / "cache"
    config = write_config(tmp_path / "train.yaml", TRAIN_CONFIG)
    args = ["train", cache, "--out", tmp_path / "model", "--config", config, "--rank-loss",
            "soft", *GRID_ARGS]
    t0 = time.perf_counter()
    reference = [str(a) for a in args]
    reference[3] = str(tmp_path / "ref")
    assert main(reference) == 0
    full = time.perf_counter() - t0
    proc = brainrank(args, api_url)
    assert _wait(proc, lambda: (tmp_path / ".model.lock").exists())
    # A second run on the same folder exits 2 at once, naming the holder. The holder is
    # stopped meanwhile (a stalled run holds its lock too): a tiny training can otherwise end
    # before the second process has imported enough to ask for the lock.
    proc.send_signal(signal.SIGSTOP)
    try:
        second = brainrank(args, api_url)
        _, err = second.communicate(timeout=240)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and f"pid {proc.pid}" in lines[0] and "started" in lines[0]
    delay = RNG.uniform(0.0, full)
    killed = _wait(proc, _after(delay))
    _kill9(proc)
    t0 = time.perf_counter()
    assert main(list(map(str, args))) == 0
    rerun = time.perf_counter() - t0
    assert _weights(tmp_path / "model") == _weights(tmp_path / "ref")
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    ref = json.loads((tmp_path / "ref" / "card.json").read_text())
    assert card["metrics"] == ref["metrics"]
    assert _strays(tmp_path) == []
    _report("train kill -9", killed_after_s=round(delay, 1) if killed else "none (finished)",
            full_s=round(full, 1), rerun_s=round(rerun, 1))


@pytest.mark.xfail(strict=False, reason="open: the last fresh-clone CI saw the rerun's headline "
                   "metrics differ in late digits from the uninterrupted run (MAE 15.95...) at one "
                   "random kill point, after bn_refresh landed; resume determinism to diagnose")
def test_kill_pipeline_at_a_random_point_then_rerun(run, api_url, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["pipeline", "--config", run["config"], "--out", run_dir]
    proc = brainrank(args, api_url)
    assert _wait(proc, lambda: (tmp_path / ".run.lock").exists())
    delay = RNG.uniform(0.0, run["seconds"])
    reached = _after(delay)
    killed = _wait(proc, reached)
    _kill9(proc)
    t0 = time.perf_counter()
    assert main(list(map(str, args))) == 0
    rerun = time.perf_counter() - t0
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["headline"] == run["state"]["headline"]
    assert _weights(run_dir / "model") == _weights(run["dir"] / "model")
    assert _strays(run_dir) == [] and not (tmp_path / ".run.lock").exists()
    _report("pipeline kill -9", killed_after_s=round(delay, 1) if killed else "none (finished)",
            full_s=round(run["seconds"], 1), rerun_s=round(rerun, 1),
            rerun_stages={k: v["status"] for k, v in state["stages"].items()})

    # A flipped byte in pipeline.json: named, ignored, and every stage checked again.
    flip_digit(run_dir / "pipeline.json")
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(list(map(str, args))) == 0
    err = capsys.readouterr().err
    assert "pipeline.json" in err and "corrupt" in err and "checked again" in err
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["headline"] == run["state"]["headline"]
    _report("pipeline.json flipped byte", rerun_s=round(time.perf_counter() - t0, 1),
            stages={k: v["status"] for k, v in state["stages"].items()})


@pytest.mark.parametrize("kind", ["shard", "manifest", "card", "weights", "bias.json"])
def test_a_flipped_byte_is_detected_and_named(run, tmp_path, capsys, kind):
    import shutil

    shutil.copytree(run["dir"] / "cache", tmp_path / "cache")
    shutil.copytree(run["dir"] / "model", tmp_path / "model")
    cache, model = tmp_path / "cache", tmp_path / "model"
    layout = find_layout(cache)
    target = {"shard": next(layout.shard_dir.glob("*.parquet")),
              "manifest": layout.manifest_path, "card": model / "card.json",
              "weights": model / "stage2" / "model.safetensors",
              "bias.json": model / "bias.json"}[kind]
    if kind == "shard":  # a byte of the volume's data (what a result is made of)
        flip_byte(target, volume_page_offset(target))
    else:
        (flip_byte if kind == "weights" else flip_digit)(target)
    capsys.readouterr()
    if kind == "bias.json":
        argv = ["predict", model, run["dir"] / "cohort-split.csv", "--out", tmp_path / "p.csv",
                "--bias-correct"]
    else:
        argv = ["evaluate", model, cache, "--out", tmp_path / "r", "--split", "all",
                "--n-boot", "0"]
    assert main(list(map(str, argv))) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "corrupt" in err[0] and target.name in err[0], err
    if kind == "shard":  # ingest finds it (checksum), rebuilds that shard only
        args = ["ingest", run["dir"] / "cohort-split.csv", "--cache", cache, *GRID_ARGS,
                "--allow-outside-root"]
        assert main(list(map(str, args))) == 0
        out = capsys.readouterr().out
        assert main(list(map(str, argv))) == 0
        _report("shard flipped byte", ingest=out.splitlines()[0])
    else:
        _report(f"{kind} flipped byte", detected=err[0][:80])


def test_a_flipped_byte_in_a_page_header_is_detected_or_changes_nothing(run, tmp_path, capsys):
    """The page checksum covers a page's data, not its few-byte header: a flip there either
    fails the read (exit 2 naming the shard) or leaves every prediction identical; `ingest`
    finds it either way (the manifest's whole-file CRC-32)."""
    import shutil

    import pyarrow.csv as pcsv

    shutil.copytree(run["dir"] / "cache", tmp_path / "cache")
    cache, model = tmp_path / "cache", run["dir"] / "model"
    argv = lambda out: ["evaluate", model, cache, "--out", tmp_path / out,  # noqa: E731
                        "--split", "all", "--n-boot", "0", "--no-store-bias"]
    assert main(list(map(str, argv("ref")))) == 0
    target = next(find_layout(cache).shard_dir.glob("*.parquet"))
    flip_byte(target, volume_page_offset(target, 0.0) + 3)
    capsys.readouterr()
    code = main(list(map(str, argv("flipped"))))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    read = lambda out: pcsv.read_csv(tmp_path / out / "predictions.csv")  # noqa: E731
    if code == 2:
        assert len(err) == 1 and "corrupt" in err[0] and target.name in err[0], err
    else:
        assert code == 0
        assert read("flipped").equals(read("ref"))
    args = ["ingest", run["dir"] / "cohort-split.csv", "--cache", cache, *GRID_ARGS,
            "--allow-outside-root"]
    assert main(list(map(str, args))) == 0
    ingest = capsys.readouterr().out.splitlines()[0]
    assert main(list(map(str, argv("after")))) == 0
    assert read("after").equals(read("ref"))
    _report("shard page-header flipped byte", evaluate="exit 2" if code == 2 else "identical",
            ingest=ingest)


def test_every_error_path_is_at_most_three_lines_with_exit_2(run, api_url, tmp_path):
    cache, model = run["dir"] / "cache", run["dir"] / "model"
    manifest = run["dir"] / "cohort-split.csv"
    bad_utf8 = tmp_path / "bad.yaml"
    bad_utf8.write_bytes(b"epochs: 1 # \xff\n")
    not_mapping = write_config(tmp_path / "list.yaml", [1, 2])  # type: ignore[arg-type]
    bad_options = write_config(tmp_path / "opts.yaml", {"train": {"options": {"lrr": 1}}})
    held = tmp_path / "held"
    c = lambda *a: [str(x) for x in a]  # noqa: E731
    cases = {
        "config not UTF-8": c("train", cache, "--out", tmp_path / "m", "--config", bad_utf8),
        "config not a mapping": c("ingest", manifest, "--cache", tmp_path / "c", "--config",
                                  not_mapping),
        "no such cohort": c("ingest", tmp_path / "nope.csv", "--cache", tmp_path / "c"),
        "grid too large": c("ingest", manifest, "--cache", tmp_path / "c", "--shape", "640",
                            "640", "640", "--spacing", "1"),
        "cache held (in the flow)": c("ingest", manifest, "--cache", tmp_path / "held-cache",
                                      *GRID_ARGS, "--allow-outside-root"),
        "no cache": c("train", tmp_path / "nothing", "--out", tmp_path / "m"),
        "folder held": c("train", cache, "--out", held),
        "unknown split": c("evaluate", model, cache, "--out", tmp_path / "r", "--split", "x"),
        "bad predictions file": c("predict", model, manifest, "--out", tmp_path / "p.txt"),
        "bad train options": c("pipeline", "--config", bad_options, "--out", tmp_path / "run"),
        "pipeline into a foreign folder": c("pipeline", "--out", run["base"]),
    }
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    results = tmp_path / "results.json"
    grid = GRID_CONFIG
    with run_lock(held), cache_lock(CacheLayout.for_config(tmp_path / "held-cache", grid)):
        subprocess.run([sys.executable, str(Path(__file__).with_name("_error_paths.py")),
                        str(spec), str(results)], env=cli_env(api_url), check=True,
                       cwd=Path(__file__).parents[1], timeout=600)
    for name, r in json.loads(results.read_text()).items():
        lines = error_lines(r["stderr"])
        assert r["code"] == 2, (name, r)
        assert "Traceback" not in r["stderr"] and 1 <= len(lines) <= 3, (name, lines)
        assert lines[-1].startswith("brainrank "), (name, lines)
    _report("error paths", cases=len(cases))


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append((int(stat.parent.name), cmd))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_leaves_no_temporary_prefect_server(tmp_path):
    env = {**cli_env(None), "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "simulate", str(tmp_path / "c"),
                             "--subjects", "2", "--spacing", "4"], env=env,
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    found: list = []
    assert _wait(proc, lambda: bool(found.extend(
        p for p, cmd in _children(proc.pid) if "uvicorn" in cmd) or found), timeout=120)
    _kill9(proc)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in found)
    _report("kill -9 with a temporary server", server_gone_s=round(30 - (deadline -
                                                                          time.monotonic()), 1))

