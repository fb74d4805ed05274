"""How ingest and Ray training scale with the cohort: throughput and memory at 3 mm.

Run: ``python benchmarks/bench_scale.py [--sizes 250 1000 4000] [--workdir DIR] [--epochs 1]``.
Not a test: it prints one Markdown table at the end, and each measurement on stderr as it is
taken. For each size N:

* a simulated cohort of N subjects (``simulate_cohort``, 3 mm working grid; not timed here);
* ingest into a fresh cache at 3 mm, (56, 64, 56), float16, with 1 and with 2 local worker
  processes: subjects per second (wall time of ``ingest_cohort``);
* one stage-1 training run on Ray (``train_stage_ray`` from a ``CacheSplit``: each worker
  reads its own rows) with 1 and with 2 Ray Train workers, each in a fresh driver process that
  starts its own local Ray: training samples per second of the last epoch (validation
  excluded), the driver's peak RSS (``getrusage``) and each Ray Train worker's peak RSS
  (``VmHWM``) with the peaks of its anonymous memory and of its file-backed pages (the
  memory-mapped cache: page cache, shared and reclaimable), sampled every 0.5 s from /proc.

Targets (the issue's): the driver's RSS flat (within 10 %) across sizes; a worker's RSS bounded
by its batch buffer, not the cohort; 2 ingest workers >= 1.6 x one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACING, SHAPE = 3.0, (56, 64, 56)

_DRIVER = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    from rankcore.cache import VolumeDataset
    from rankcore.cache.engines import ensure_ray
    from rankcore.cache.ray_reaper import descendants
    from rankcore.train.cache_split import CacheSplit
    from rankcore.train.ray_train import train_stage_ray
    cache, out, workers, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ensure_ray(num_cpus=max(workers, 2))
    peaks, done = {}, threading.Event()

    def title(pid):
        try:
            return open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode()
        except OSError:
            return ""

    def status(pid):
        out = {}
        try:
            for line in open(f"/proc/{pid}/status"):
                key = line.split(":")[0]
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024
        except OSError:
            pass
        return out

    def sample():
        while not done.is_set():
            for pid in descendants([os.getpid()]):
                if "TrainWorker" in title(pid):
                    old = peaks.setdefault(pid, {})
                    for k, v in status(pid).items():
                        old[k] = max(old.get(k, 0.0), v)
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    keys = tuple(VolumeDataset(cache).keys)
    config = {"epochs": epochs, "batch_size": 16, "eval_batch_size": 16, "device": "cpu",
              "num_threads": 1}
    t0 = time.perf_counter()
    res = train_stage_ray(1, config, CacheSplit(cache, keys=keys, preload=False), None,
                          out_dir=out, num_workers=workers)
    done.set()
    print(json.dumps({"samples_per_s": res.history[-1]["samples_per_s"],
                      "seconds": time.perf_counter() - t0,
                      "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_rss_mb": [p.get("VmHWM", 0.0) for p in peaks.values()],
                      "worker_anon_mb": [p.get("RssAnon", 0.0) for p in peaks.values()],
                      "worker_file_mb": [p.get("RssFile", 0.0) for p in peaks.values()]}))
""")


def _ingest(cohort: Path, cache: Path, workers: int) -> float:
    from rankcore.cache import ingest_cohort
    from rankcore.mri import PreprocessConfig, read_cohort

    parsed = read_cohort(cohort)
    t0 = time.perf_counter()
    summary = ingest_cohort(parsed, cache, PreprocessConfig(spacing=SPACING, shape=SHAPE),
                            workers=workers)
    seconds = time.perf_counter() - t0
    return summary.total / seconds


def _train(cache: Path, out: Path, workers: int, epochs: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", _DRIVER, str(cache), str(out), str(workers),
                          str(epochs)], env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"training with {workers} worker(s) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(sizes: list[int], workdir: Path, epochs: int) -> str:
    from rankcore.mri.simulate import simulate_cohort

    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        cohort = simulate_cohort(workdir / f"cohort-{n}", n, seed=0, spacing=SPACING,
                                 workers=2)
        sim_s = time.perf_counter() - t0
        _progress(f"N={n}: simulated in {sim_s:.0f} s")
        ingest, train = {}, {}
        for w in (1, 2):  # each measurement is printed as it is taken: a stopped run keeps them
            ingest[w] = _ingest(cohort, workdir / f"cache-{n}-w{w}", w)
            _progress(f"N={n}: ingest with {w} worker(s): {ingest[w]:.2f} subjects/s")
        for w in (1, 2):
            train[w] = _train(workdir / f"cache-{n}-w1", workdir / f"model-{n}-w{w}", w, epochs)
            _progress(f"N={n}: training with {w} Ray worker(s): {json.dumps(train[w])}")
        rows.append((n, sim_s, ingest, train))
        print(f"done N={n}: {json.dumps({'ingest': ingest, 'train': train})}", file=sys.stderr)
    lines = [f"3 mm, {SHAPE}, float16 cache; {os.cpu_count()} CPUs; training: default "
             f"backbone, batch 16, {epochs} epoch(s), one intra-op thread per worker", "",
             "| subjects | ingest 1 w (subj/s) | ingest 2 w (subj/s) | 2 w / 1 w | "
             "train 1 w (samples/s) | train 2 w (samples/s) | driver RSS 1 w / 2 w (MB) | "
             "worker RSS 1 w / 2 w (MB) | worker anon + file 2 w (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, _sim, ingest, train in rows:
        w1, w2 = train[1], train[2]
        lines.append(
            f"| {n} | {ingest[1]:.2f} | {ingest[2]:.2f} | {ingest[2] / ingest[1]:.2f} | "
            f"{w1['samples_per_s']:.1f} | {w2['samples_per_s']:.1f} | "
            f"{w1['driver_rss_mb']:.0f} / {w2['driver_rss_mb']:.0f} | "
            f"{', '.join(f'{r:.0f}' for r in w1['worker_rss_mb'])} / "
            f"{', '.join(f'{r:.0f}' for r in w2['worker_rss_mb'])} | "
            + ", ".join(f"{a:.0f} + {f:.0f}" for a, f in zip(w2["worker_anon_mb"],
                                                            w2["worker_file_mb"])) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keep the cohorts and caches here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.workdir:
        print(run(args.sizes, Path(args.workdir), args.epochs))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            print(run(args.sizes, Path(tmp), args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
