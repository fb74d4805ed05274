"""Stage 1 alone on a small simulated cohort: the prior only, the network only, and both.

Trains :func:`rankcore.train.train_stage` (stage 1, one process, one thread) once per model
choice (``TrainConfig.model``) on the ``train`` rows of an ingested cache, with a seeded 10 %
of them held out for validation (early stopping, epoch -1 = the prior alone), and scores the
``test`` rows. Prepare the cohort first, e.g.::

    brainrank simulate /tmp/nb/cohort --subjects 200 --seed 0
    # mark 50 subjects split=test (bench_accuracy.prepare does the same), then
    brainrank ingest /tmp/nb/cohort --cache /tmp/nb/c3 --spacing 3 --shape 54 64 54

Usage::

    .venv/bin/python benchmarks/bench_network.py /tmp/nb/c3 --spacing 3 --shape 54 64 54 \\
        --models prior,network,both --set epochs=12 --set batch_size=8

Prints one Markdown row per model choice (validation and test MAE / SRCC, best epoch, wall
time) and writes them as JSON next to the cache (``bench_network-<tag>.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load(cache: str, spacing: float, shape: tuple[int, int, int], val_fraction: float,
         seed: int):
    """(train, val, test) SubjectData of the cache's ``train`` / ``test`` rows."""
    from rankcore.cache import VolumeDataset
    from rankcore.mri.types import PreprocessConfig
    from rankcore.train.data import SubjectData

    ds = VolumeDataset(cache, PreprocessConfig(spacing=spacing, shape=shape))
    data = SubjectData.from_dataset(ds)
    split = np.array(ds.view.table.column("split").to_pylist())
    pool, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    perm = np.random.default_rng(seed).permutation(pool)
    n_val = max(1, round(val_fraction * len(pool)))
    return (data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val])),
            data.subset(test))


def run(train, val, test, model: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Train one model choice and score it on validation and test."""
    from rankcore.train.cascade_plan import default_config
    from rankcore.train.loop import train_stage
    from rankcore.train.predict import evaluate, predict

    config = default_config(**{**changes, "model": model})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-network-") as out:
        res = train_stage(1, config, train, val, out_dir=out)
    seconds = time.perf_counter() - t0
    steps = [m for m in res.history if m["epoch"] >= 0]
    return {"model": model, "best_epoch": res.best_epoch, "epochs_run": len(steps),
            "seconds": seconds,
            "samples_per_s": float(np.median([m["samples_per_s"] for m in steps]))
            if steps else None,
            "val_curve": [round(m["val_mae"], 3) for m in res.history],
            "val": evaluate(predict(res.model, val), val.ages),
            "test": evaluate(predict(res.model, test), test.ages)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--shape", type=int, nargs=3, default=(54, 64, 54))
    p.add_argument("--models", default="prior,network,both")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig change (JSON value), e.g. epochs=12")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    changes: dict[str, Any] = {"seed": args.seed}
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = _value(value)
    train, val, test = load(args.cache, args.spacing, tuple(args.shape), 0.1, args.seed)
    print(f"cohort: {len(train)} train / {len(val)} val / {len(test)} test, "
          f"{args.spacing:g} mm {tuple(args.shape)}, {train.channels} channel(s), "
          f"{len(train.feature_names)} tabular feature(s); changes {changes}", flush=True)
    print("| model | val MAE | val SRCC | test MAE | test SRCC | best epoch | epochs | "
          "samples/s | wall s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for model in args.models.split(","):
        r = run(train, val, test, model, changes)
        rows.append(r)
        sps = "–" if r["samples_per_s"] is None else f"{r['samples_per_s']:.1f}"
        print(f"| {model} | {r['val']['mae']:.2f} | {r['val']['srcc']:.3f} | "
              f"{r['test']['mae']:.2f} | {r['test']['srcc']:.3f} | {r['best_epoch']} | "
              f"{r['epochs_run']} | {sps} | {r['seconds']:.0f} |", flush=True)
    tag = hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:8]
    out = Path(args.cache) / f"bench_network-{tag}.json"
    out.write_text(json.dumps({"changes": changes, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
