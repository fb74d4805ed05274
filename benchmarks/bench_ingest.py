"""Time the ingest into the Parquet cache against the bare nibabel read of the same files.

Run: ``python benchmarks/bench_ingest.py [--subjects 40] [--seed 0] [--workdir DIR]``. Not a
test: it prints one Markdown table. Everything runs on the same simulated cohort
(``simulate_cohort``, default 2 mm quirky files, .nii and .nii.gz mixed) and the default
PreprocessConfig (2 mm, 80x96x80, float16), one process, ``workers=1``:

Each timing is the best of ``--repeat`` passes (default 3; one more for the cached rerun).

* bare load: ``nibabel.load(path).get_fdata()`` per file (the I/O + decompression floor);
  files are read once beforehand so every timing starts from a warm page cache.
* preprocess only: ``rankcore.mri.preprocess_file`` per file, no cache (the numerics).
* fresh ingest: ``ingest_cohort`` into an empty cache with its default batches (up to 64
  subjects per batch and shard, so one shard here): each file read once, sha256 of its
  bytes, preprocess from those bytes, row streamed into the shard (page CRCs and a
  whole-file CRC-32 while written), fsyncs, manifest and quarantine table.
* cached rerun: ``ingest_cohort`` again on the unchanged cohort (stat + manifest + CRC-32
  of every shard byte; nothing is processed or written).
* peak memory: a fresh subprocess per cohort size ingests the first N subjects and reports
  its peak RSS (``resource.getrusage``) and the tracemalloc peak of the ingest call and of one
  pass of ``VolumeDataset`` over the cache; the target is "independent of cohort size".
Per-subject times divide by the number of subject rows (valid and quarantined).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib

from rankcore.cache import VolumeDataset, ingest_cohort
from rankcore.mri import PreprocessConfig, preprocess_file, read_cohort
from rankcore.mri.simulate import simulate_cohort
from rankcore.mri.types import Cohort


def _subset(cohort: Cohort, n: int) -> Cohort:
    return dataclasses.replace(cohort, rows=cohort.rows[:n], quarantine=())


def _per_subject(fn, paths) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return (time.perf_counter() - t0) / len(paths)


def probe(cohort_dir: Path, n: int, cache: Path) -> dict:
    """Ingest the first ``n`` subjects into an empty ``cache``; report memory peaks (MiB)."""
    cohort = _subset(read_cohort(cohort_dir), n)
    config = PreprocessConfig()
    tracemalloc.start()
    ingest_cohort(cohort, cache, config)
    _, ingest_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    ds = VolumeDataset(cache, config)
    for i in range(len(ds)):
        ds[i]
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"n": n, "rss_mib": rss_kib / 1024, "ingest_traced_mib": ingest_peak / 2**20,
            "read_traced_mib": read_peak / 2**20, "items": len(ds)}


def _probe_in_subprocess(cohort_dir: Path, n: int, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--probe", str(n), "--cohort", str(cohort_dir),
           "--cache", str(cache)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(subjects: int, seed: int, workdir: Path, repeat: int = 3) -> str:
    cohort_dir = workdir / "cohort"
    t0 = time.perf_counter()
    simulate_cohort(cohort_dir, subjects=subjects, seed=seed)
    # Flush the simulator's writes first, so they are not billed to the fresh ingest below.
    os.sync()
    sim_s = time.perf_counter() - t0
    cohort = _subset(read_cohort(cohort_dir), subjects)
    paths = [r.path for r in cohort.rows]
    config = PreprocessConfig()
    for p in paths:  # warm the page cache for every measurement alike
        p.read_bytes()

    # Best of `repeat` passes each (the machine is shared; the minimum is the least noisy).
    bare = min(_per_subject(lambda p: nib.load(p).get_fdata(), paths) for _ in range(repeat))
    prep = min(_per_subject(lambda p: preprocess_file(p, config), paths) for _ in range(repeat))
    fresh, cached = float("inf"), float("inf")
    for k in range(repeat):
        t0 = time.perf_counter()
        fresh_summary = ingest_cohort(cohort, workdir / f"cache-fresh-{k}", config)
        fresh = min(fresh, (time.perf_counter() - t0) / len(paths))
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        cached_summary = ingest_cohort(cohort, workdir / "cache-fresh-0", config)
        cached = min(cached, (time.perf_counter() - t0) / len(paths))
        assert cached_summary.ingested == 0 and cached_summary.reused == fresh_summary.ingested

    half = max(1, subjects // 2)
    mem = [_probe_in_subprocess(cohort_dir, n, workdir / f"cache-{n}") for n in (half, subjects)]
    small, big = mem

    def ok(flag: bool) -> str:
        return "yes" if flag else "**no**"

    lines = [
        f"Ingest benchmark: {subjects} simulated subjects (seed {seed}), output "
        f"{config.spacing:g} mm {'x'.join(map(str, config.shape))} {config.dtype}, workers=1, "
        f"best of {repeat} passes, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"simulation took {sim_s:.1f} s; ingested {fresh_summary.ingested}, quarantined "
        f"{fresh_summary.n_quarantined}.",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        f"| bare `nibabel.load().get_fdata()`, s/subject | {bare:.4f} | | |",
        f"| `preprocess_file` alone (no cache), s/subject | {prep:.4f} | | |",
        f"| fresh ingest, s/subject | {fresh:.4f} | | |",
        f"| cache overhead (fresh ingest - preprocess), s/subject | {fresh - prep:.4f} | | |",
        f"| fresh ingest / bare load | {fresh / bare:.1f}x | <= 3x | {ok(fresh / bare <= 3)} |",
        f"| cached rerun, s/subject | {cached:.5f} | | |",
        f"| fresh / cached rerun | {fresh / cached:.0f}x faster | >= 20x | "
        f"{ok(fresh / cached >= 20)} |",
    ]
    for m in mem:
        lines.append(f"| peak RSS, ingest + read of {m['n']} subjects (subprocess), MiB | "
                     f"{m['rss_mib']:.0f} | | |")
    for m in mem:
        lines.append(f"| tracemalloc peak: ingest {m['n']} / read {m['items']} subjects, MiB | "
                     f"{m['ingest_traced_mib']:.1f} / {m['read_traced_mib']:.1f} | | |")
    rss_ratio = big["rss_mib"] / small["rss_mib"]
    traced_ratio = big["ingest_traced_mib"] / small["ingest_traced_mib"]
    lines.append(f"| peak RSS ratio {big['n']} / {small['n']} subjects | {rss_ratio:.2f} | "
                 f"~1 (size-independent) | {ok(rss_ratio < 1.15)} |")
    lines.append(f"| traced ingest peak ratio {big['n']} / {small['n']} subjects | "
                 f"{traced_ratio:.2f} | ~1 | {ok(traced_ratio < 1.15)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="passes per timing (best kept)")
    parser.add_argument("--workdir", default=None,
                        help="keep the cohort and caches here (default: a temporary folder)")
    parser.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cohort", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(Path(args.cohort), args.probe, Path(args.cache))))
        return 0
    if args.subjects < 2:
        parser.error("--subjects must be at least 2")
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        print(run(args.subjects, args.seed, workdir, args.repeat))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            print(run(args.subjects, args.seed, Path(tmp), args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
