"""Cascade accuracy on simulated cohorts: loss ablation, stage 1 vs cascade, OOF vs in-sample.

For every cohort seed S (also the training seed) a cohort of ``train + test`` subjects is
simulated at 2 mm (:func:`rankcore.mri.simulate.simulate_cohort`; with per-subject anatomy
unless ``--no-anatomy``, a switch that is part of the cohort, cache and run names), ``test``
of them are marked ``split=test`` (a seeded permutation) and the rest ``train``; the cohort is
ingested into a Parquet cache (:func:`rankcore.cache.ingest_cohort`).
:func:`rankcore.train.train_cascade` then carves the validation subjects out of the training
pool (``val_fraction`` 0.1) and :func:`rankcore.report.evaluate.evaluate_model` scores the
held-out test split, stage 1 alone and the cascade side by side, against the simulator's
irreducible floor (mean |brain age − age| over the same test subjects).

Configurations (``--configs``; every one changes :func:`rankcore.train.default_config`):

    mse       MSE only (rank_loss none, diff_weight 0)
    ld        MSE + 10 · Ld, the reference's Ld weight (rank_loss none, preset reference)
    sorter    + Spearman through the shipped pairwise sorter (rank_loss sorter, default w_rank)
    soft      + soft Spearman (pairwise): the default configuration
    insample  soft, but stage 2 trained on IN-SAMPLE stage-1 estimates (no cross-fitting)
    reference the reference's MSE + 10(S + Ld) with the shipped pairwise sorter

``--rank-share 0,0.03,0.1,0.3`` sweeps the Spearman term's share of the gradient: every chosen
configuration with a rank term runs once per share s (named ``NAME@share<s>``) with
``rank_share=s`` (w_rank calibrated on the initial predictions of each stage; the resolved
weight is in the card); configurations without a rank term run once.

Robustness (``--loso SITE[,SITE...]``): the default configuration (soft) trained on the other
sites and tested on every subject of SITE (an unseen scanner), one row per held-out site. Its
cache is a hard-linked copy of the seed's cache relabelled by a second, incremental ingest
(no image is preprocessed again).

``--set key=value`` changes every configuration further (e.g. ``--set diff_weight=0.1``); the
runs are named by a digest of their config, so changed settings get their own model folders.
Everything lives under ``--work`` (default /tmp/bench_accuracy) and is reused across
invocations: simulation, ingest and finished training runs are idempotent.

Usage::

    .venv/bin/python benchmarks/bench_accuracy.py --seeds 0 --configs soft
    .venv/bin/python benchmarks/bench_accuracy.py --seeds 0,1,2 --jobs 2
    .venv/bin/python benchmarks/bench_accuracy.py --seeds 0 --configs soft --loso site3
    .venv/bin/python benchmarks/bench_accuracy.py --seeds 0 --configs soft --no-anatomy

Prints one Markdown table: per configuration, stage 1 and cascade rows with MAE, SRCC, Pearson r
and MAE/floor as mean ± sd over the seeds, and the wall time per run (train + evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS: dict[str, dict[str, Any]] = {
    "mse": {"rank_loss": "none", "diff_weight": 0.0},
    "ld": {"rank_loss": "none", "objective_preset": "reference"},
    "sorter": {"rank_loss": "sorter", "sorter": "pairwise"},
    "soft": {},
    "insample": {},
    "reference": {"objective_preset": "reference", "rank_loss": "sorter", "sorter": "pairwise"},
}
LABELS = {
    "mse": "(a) MSE only",
    "ld": "(b) MSE + 10·Ld",
    "sorter": "(c) + sorter Spearman (pairwise)",
    "soft": "(d) + soft Spearman (pairwise, default)",
    "insample": "(e) default, stage 2 in-sample",
    "reference": "(f) reference MSE + 10(S + Ld), sorter",
}
log = logging.getLogger("bench_accuracy")
_LOSO = "loso-"  # run name prefix of a held-out site: "loso-site3"


def _world(anatomy: bool) -> str:
    """Name part of the simulated world (simulator version and anatomy switch)."""
    from rankcore.mri.simulate import SIMULATOR_VERSION

    return f"v{SIMULATOR_VERSION}-{'anat' if anatomy else 'flat'}"


def _base(name: str) -> tuple[str, dict[str, Any]]:
    """(configuration, its TrainConfig changes) of a run name ``NAME`` or ``NAME@share<s>``.

    A held-out-site run ``loso-SITE`` trains the default configuration (soft).
    """
    if name.startswith(_LOSO):
        return "soft", dict(CONFIGS["soft"])
    base, _, share = name.partition("@share")
    return base, {**CONFIGS[base], **({"rank_share": float(share)} if share else {})}


def _label(name: str) -> str:
    if name.startswith(_LOSO):
        return f"(g) default, unseen {name[len(_LOSO):]} (trained on the other sites)"
    base, _, share = name.partition("@share")
    return LABELS[base] + (f", Spearman share {share}" if share else "")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def prepare(work: Path, seed: int, n_train: int, n_test: int, anatomy: bool = True,
            loso: tuple[str, ...] = ()) -> dict[str, Path]:
    """Simulate, split and ingest the cohort of ``seed``; return the cache root of each run.

    Keys: "" (the random train/test split) and ``"loso-SITE"`` for each held-out site.
    """
    from rankcore.cache import ingest_cohort
    from rankcore.mri import PreprocessConfig, read_cohort
    from rankcore.mri.simulate import simulate_cohort

    world = _world(anatomy)
    cohort_dir = work / f"cohort-s{seed}-n{n_train + n_test}-{world}"
    simulate_cohort(cohort_dir, n_train + n_test, seed, spacing=2.0, anatomy=anatomy)
    cohort = read_cohort(cohort_dir)
    keys = sorted(r.key for r in cohort.rows)
    order = np.random.default_rng(seed).permutation(len(keys))
    test = {keys[i] for i in order[:n_test]}
    rows = tuple(dataclasses.replace(r, split="test" if r.key in test else "train")
                 for r in cohort.rows)
    cache_dir = work / f"cache-s{seed}-{n_train}+{n_test}-{world}"
    ingest_cohort(dataclasses.replace(cohort, rows=rows), cache_dir, PreprocessConfig(),
                  workers=1)
    caches = {"": cache_dir}
    sites = sorted({r.site for r in cohort.rows if r.site})
    for site in loso:
        if site not in sites:
            raise SystemExit(f"--loso: site {site!r} is not in the cohort ({', '.join(sites)})")
        held_out = cache_dir.with_name(f"{cache_dir.name}-{_LOSO}{site}")
        if not held_out.exists():  # hard links: the cache replaces files, never edits them
            shutil.copytree(cache_dir, held_out, copy_function=os.link)
        rows = tuple(dataclasses.replace(r, split="test" if r.site == site else "train")
                     for r in cohort.rows)
        ingest_cohort(dataclasses.replace(cohort, rows=rows), held_out, PreprocessConfig(),
                      workers=1)
        caches[f"{_LOSO}{site}"] = held_out
    return caches


def _run_paths(work: str | Path, seed: int, name: str, changes: dict[str, Any],
               k_folds: int, anatomy: bool = True) -> tuple[dict[str, Any], Path, Path]:
    """(config, model folder, report folder) of one run; the folders are named by the config."""
    from rankcore.train.cascade_plan import default_config

    base, named = _base(name)
    config = {"seed": seed, **named, **changes}
    # The tag covers the resolved config (library defaults included), so a run made before a
    # default changed is not reused for the new default; and the simulated world.
    resolved = default_config(**config).to_dict()
    tag = hashlib.sha256(json.dumps([resolved, k_folds, base == "insample", _world(anatomy)],
                                    sort_keys=True, default=str).encode()).hexdigest()[:10]
    model_dir = Path(work) / "models" / f"s{seed}-{name}-{_world(anatomy)}-{tag}"
    return config, model_dir, Path(work) / "reports" / model_dir.name


def run_one(work: str, cache_dir: str, seed: int, name: str, changes: dict[str, Any],
            k_folds: int, anatomy: bool = True) -> dict[str, Any]:
    """Train one cascade and evaluate it on the test split (runs in a worker process)."""
    import torch

    torch.set_num_threads(1)
    from rankcore.report.evaluate import evaluate_model
    from rankcore.train.cascade import train_cascade

    config, model_dir, report_dir = _run_paths(work, seed, name, changes, k_folds, anatomy)
    kw: dict[str, Any] = {"k_folds": k_folds}
    if _base(name)[0] == "insample":
        kw["stage2_source"] = "insample"
    t0 = time.perf_counter()
    result = train_cascade(cache_dir, model_dir, config, workers=1, **kw)
    t_train = time.perf_counter() - t0
    evaluate_model(model_dir, cache_dir, report_dir, split="test", n_boot=200, seed=seed)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    seconds = time.perf_counter() - t0
    floor = (metrics.get("floor") or {}).get("mae")
    out = {"seed": seed, "name": name, "anatomy": anatomy, "config": config,
           "model_dir": str(model_dir),
           "reused": result.reused, "train_s": t_train, "seconds": seconds, "floor": floor,
           "card_seconds": result.card.get("seconds")}
    for stage, block in (("stage1", metrics["stage1"]), ("cascade", metrics)):
        out[stage] = {m: block.get(m) for m in ("mae", "srcc", "pearson_r")}
    (report_dir / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _ms(values: list[float], digits: int) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def table(results: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown table: per configuration and stage, mean ± sd over seeds."""
    lines = ["| configuration | stage | seeds | MAE (y) | SRCC | Pearson r | MAE/floor | "
             "wall s/run |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        for stage in ("stage1", "cascade"):
            ratio = [r[stage]["mae"] / r["floor"] for r in runs if r["floor"]]
            wall = _ms([r["seconds"] for r in runs if not r["reused"]], 0) \
                if stage == "stage1" else ""
            lines.append(f"| {_label(name)} | {stage} | {seeds} | "
                         f"{_ms([r[stage]['mae'] for r in runs], 2)} | "
                         f"{_ms([r[stage]['srcc'] for r in runs], 3)} | "
                         f"{_ms([r[stage]['pearson_r'] for r in runs], 3)} | "
                         f"{_ms(ratio, 2)} | {wall} |")
    floors = sorted({round(r["floor"], 3) for r in results if r["floor"]})
    lines.append("")
    lines.append(f"floor (mean |brain age − age| over the test subjects): "
                 f"{', '.join(f'{f:.2f}' for f in floors)} y")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated cohort/training seeds")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--train", type=int, default=300, help="training pool (incl. validation)")
    ap.add_argument("--test", type=int, default=120, help="held-out test subjects")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per stage (default 15)")
    ap.add_argument("--k-folds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="TrainConfig change applied to every configuration (JSON values)")
    ap.add_argument("--rank-share", default=None, metavar="S1,S2,...",
                    help="Spearman gradient shares to sweep (e.g. 0,0.03,0.1,0.3): configs "
                         "with a rank term run once per share")
    ap.add_argument("--work", default="/tmp/bench_accuracy")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--anatomy", action=argparse.BooleanOptionalAction, default=True,
                    help="simulate per-subject anatomy (a smooth random warp); default on")
    ap.add_argument("--loso", default="", metavar="SITE[,SITE...]",
                    help="also train the default config on the other sites and test on each "
                         "of these (e.g. site3), one row per held-out site")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: tabulate the finished runs found under --work")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)

    seeds = [int(s) for s in args.seeds.split(",") if s]
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if args.rank_share:
        swept = [float(v) for v in args.rank_share.split(",") if v]
        if any(not 0 <= v < 1 for v in swept):
            ap.error(f"--rank-share values must be in [0, 1), got {args.rank_share}")
        names = [n if CONFIGS[n].get("rank_loss") == "none" else f"{n}@share{v:g}"
                 for n in names for v in (swept if CONFIGS[n].get("rank_loss") != "none"
                                          else [None])]
    loso = tuple(dict.fromkeys(x for x in args.loso.split(",") if x))
    names += [f"{_LOSO}{site}" for site in loso]
    changes: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = _value(value)
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.collect:
        found = []
        for seed in seeds:
            for name in names:
                bench = _run_paths(work, seed, name, changes, args.k_folds,
                                   args.anatomy)[2] / "bench.json"
                if bench.is_file():
                    found.append(json.loads(bench.read_text()))
                else:
                    log.info("seed %d %s: not run yet", seed, name)
        print(f"\n## bench_accuracy (collected): train {args.train} / test {args.test}, "
              f"anatomy {'on' if args.anatomy else 'off'}, "
              f"changes {json.dumps(changes, sort_keys=True)}, k_folds {args.k_folds}\n")
        print(table(found, names))
        return 0
    caches = {}
    for seed in seeds:
        ts = time.perf_counter()
        caches[seed] = prepare(work, seed, args.train, args.test, args.anatomy, loso)
        log.info("seed %d: cohort + cache ready in %.0f s", seed, time.perf_counter() - ts)
    tasks = [(seed, name) for name in names for seed in seeds]
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) \
            as pool:
        futures = {pool.submit(run_one, str(work),
                               str(caches[s][n if n.startswith(_LOSO) else ""]), s, n, changes,
                               args.k_folds, args.anatomy): (s, n) for s, n in tasks}
        for fut in as_completed(futures):
            seed, name = futures[fut]
            try:
                r = fut.result()
            except Exception as err:  # report the others
                log.error("seed %d %s failed: %s: %s", seed, name, type(err).__name__, err)
                continue
            results.append(r)
            log.info("seed %d %-8s %4.0f s  stage1 MAE %.2f SRCC %.3f | cascade MAE %.2f "
                     "SRCC %.3f | floor %.2f%s", seed, name, r["seconds"], r["stage1"]["mae"],
                     r["stage1"]["srcc"], r["cascade"]["mae"], r["cascade"]["srcc"],
                     r["floor"] or float("nan"), " (reused)" if r["reused"] else "")
    print(f"\n## bench_accuracy: train {args.train} / test {args.test}, "
          f"anatomy {'on' if args.anatomy else 'off'}, "
          f"changes {json.dumps(changes, sort_keys=True)}, k_folds {args.k_folds}, "
          f"jobs {args.jobs}, {os.cpu_count()} CPUs\n")
    print(table(results, names))
    print(f"\nend to end: {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if len(results) == len(tasks) else 1


if __name__ == "__main__":
    sys.exit(main())
