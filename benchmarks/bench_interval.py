"""Coverage of the split-conformal interval on a held-out test split of a trained cascade.

Run: ``python benchmarks/bench_interval.py MODEL_DIR CACHE_DIR PREDICTIONS_CSV [--level 0.9]``

``PREDICTIONS_CSV`` is the ``predictions.csv`` that ``brainrank evaluate MODEL_DIR CACHE_DIR
--split test`` wrote. The interval is calibrated as training calibrates it (rankcore.train.
card_info.card_interval): on the model's validation predictions, its scale's slope on the
training predictions, both read from the model's per-stage prediction records (the cascade's
final stage: stage 1 when stage 2 is off), ages from the cache. It then prints, for the test
subjects of ``PREDICTIONS_CSV``, the nominal level, the measured coverage with its binomial
standard error, and the mean width. Not a test: it prints one Markdown table row.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from rankcore.cache import open_cache
from rankcore.conformal import fit_conformal, interval_coverage


def _stage_predictions(model_dir: Path) -> tuple[str, list[dict[str, str]]]:
    """The final stage's per-subject records (role train/val) of ``model_dir``."""
    card = json.loads((model_dir / "card.json").read_text())
    stage = "stage1" if card.get("stage2_source") == "off" else "stage2"
    for root in (model_dir.with_name(model_dir.name + ".records"), model_dir):
        path = root / stage / "predictions.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                return stage, list(csv.DictReader(fh))
    raise SystemExit(f"no {stage}/predictions.csv in {model_dir} or its .records folder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--level", type=float, default=0.9)
    args = ap.parse_args()

    stage, rows = _stage_predictions(args.model_dir)
    view = open_cache(args.cache_dir)
    age = dict(zip(view.table.column("key").to_pylist(), view.table.column("age").to_pylist()))
    pick = lambda role: [(float(r[stage]), float(age[r["key"]]))  # noqa: E731
                         for r in rows if r["role"] == role]
    train, val = pick("train"), pick("val")
    interval = fit_conformal([p for p, _ in val], [a for _, a in val],
                             scale_pred=[p for p, _ in train], scale_ages=[a for _, a in train],
                             level=args.level)
    with open(args.predictions, newline="") as fh:
        test = [r for r in csv.DictReader(fh) if r.get("predicted_age")]
    pred = np.array([float(r["predicted_age"]) for r in test])
    ages = np.array([float(r["age"]) for r in test])
    cov = interval_coverage(*interval.bounds(pred), ages)
    se = float(np.sqrt(args.level * (1 - args.level) / cov["n"]))
    print("| model | calibration n | test n | nominal | coverage (± binomial SE) | mean width |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model_dir.name} | {interval.n_calibration} | {cov['n']} | "
          f"{args.level:.0%} | {cov['coverage']:.1%} (± {se:.1%}) | {cov['mean_width']:.1f} y |")


if __name__ == "__main__":
    main()
