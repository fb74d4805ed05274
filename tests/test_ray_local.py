"""A Ray instance that brainrank starts: nothing listens outside loopback, its processes end
when the brainrank process dies (SIGKILL included), and the driver of a Ray training holds no
volumes (its peak RSS does not grow with the cohort)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rankcore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(rankcore.__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return env


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets that ``pids`` listen on (from ``ss -ltnpH``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p.split(",")[0]) for p in line.split("pid=")[1:]}
        if owners & pids:
            found.append(line.split()[3])
    return found


@pytest.mark.skipif(shutil.which("ss") is None or not sys.platform.startswith("linux"),
                    reason="needs Linux and ss")
def test_local_ray_listens_on_loopback_only_and_dies_with_its_driver(tmp_path):
    from rankcore.cache.ray_reaper import descendants

    script = textwrap.dedent("""
        import os, sys, time
        from rankcore.cache.engines import ensure_ray
        assert ensure_ray(num_cpus=1)
        import ray
        # a task, so that a worker process runs and listens too
        print(ray.get(ray.remote(lambda: os.getpid()).remote()), flush=True)
        print("ready", flush=True)
        time.sleep(600)
    """)
    env = _env(tmp_path)
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        worker = int(driver.stdout.readline())
        assert driver.stdout.readline().strip() == "ready"
        procs = descendants([driver.pid])
        assert worker in procs and len(procs) >= 4  # gcs, raylet, agents, worker, reaper
        addresses = _listening(set(procs))
        assert len(addresses) >= 3, addresses  # gcs, raylet, worker at least
        outside = [a for a in addresses
                   if not a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:"))]
        assert outside == [], f"listening outside loopback: {outside}"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    alive = procs
    while time.monotonic() < deadline:
        alive = {p: s for p, s in descendants(procs).items() if procs.get(p) == s}
        alive = {p: s for p, s in alive.items() if not _zombie(p)}
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, f"still running after the driver was killed: {sorted(alive)}"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:].split()[0] == b"Z"


_RSS_DRIVER = textwrap.dedent("""
    import json, resource, sys
    from rankcore.cache.engines import ensure_ray
    from rankcore.train.cascade_jobs import run_job
    from rankcore.train.cascade_plan import plan_cascade
    cache, model = sys.argv[1], sys.argv[2]
    plan = plan_cascade(cache, model, {"epochs": 1, "batch_size": 8, "eval_batch_size": 8,
                                       "backbone": {"growth": [4, 8]}},
                        engine="ray", workers=2, k_folds=2, val_fraction=0.1)
    ensure_ray(num_cpus=2)
    run_job(plan, "stage1")
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_driver_peak_rss_does_not_grow_with_the_cohort(tmp_path):
    """Training 60 vs 240 subjects at the default grid on Ray (job ``stage1``: training and
    the Ray-task predictions): the driver's peak RSS differs by less than one float16 copy of
    the 180 extra volumes, which is the least that preloading them would add."""
    import _tiny_cohort

    from rankcore.cache import VolumeDataset
    from rankcore.mri.types import PreprocessConfig

    config = PreprocessConfig(tissue=False)  # the default grid (box phantoms: no tissue)
    previous = _tiny_cohort.PREPROCESS
    _tiny_cohort.PREPROCESS = config
    try:
        caches = {n: _tiny_cohort.make_cache(tmp_path / f"c{n}", n, seed=n) for n in (60, 240)}
    finally:
        _tiny_cohort.PREPROCESS = previous
    ds = VolumeDataset(caches[240])
    per_subject_mb = ds.volume(0).nbytes / 2**20 * len(getattr(ds, "channel_names", [0]) or [0])
    rss = {}
    for n, cache in caches.items():
        out = subprocess.run([sys.executable, "-c", _RSS_DRIVER, str(cache),
                              str(tmp_path / f"model{n}")], env=_env(tmp_path),
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]
    preload_mb = 180 * per_subject_mb
    print(f"driver peak RSS: 60 subjects {rss[60]:.0f} MB, 240 subjects {rss[240]:.0f} MB; "
          f"preloading 180 more would add >= {preload_mb:.0f} MB")
    assert rss[240] - rss[60] < 0.5 * preload_mb, rss
