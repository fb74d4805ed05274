"""Tissue measured in ingest against the simulator's truth (prints a table; not a test).

Usage::

    brainrank simulate OUT --subjects 60 --seed 0
    brainrank ingest OUT --cache CACHE            # default config: tissue on
    python benchmarks/bench_tissue.py OUT CACHE

Prints: the correlation of the estimated GM, WM and CSF fractions (of the brain mask) with
the true ones of truth.tsv (pooled and within site), the registered template's Dice with the
brain mask, the CPU seconds per step (re-running ``--timed`` subjects), and the
leave-one-out MAE of a ridge of age on (a) the tissue features, (b) a 24-bin histogram of the
normalised intensity inside the brain (what the current prior sees), each with site codes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from rankcore.cache import VolumeDataset

_STEPS = ("N4", "registration", "EM", "features")


def _loo_ridge_mae(x: np.ndarray, y: np.ndarray, alphas=(0.1, 1, 10, 100, 1000)) -> tuple:
    """Leave-one-out MAE of a ridge on standardised ``x`` (closed form), best alpha."""
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    xc = np.c_[np.ones(len(x)), x]
    best = (np.inf, None)
    for a in alphas:
        pen = a * np.eye(xc.shape[1])
        pen[0, 0] = 0
        h = xc @ np.linalg.solve(xc.T @ xc + pen, xc.T)
        resid = (y - h @ y) / (1 - np.diag(h))  # exact LOO residuals of a linear smoother
        best = min(best, (float(np.mean(np.abs(resid))), a), key=lambda t: t[0])
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--timed", type=int, default=10,
                    help="re-run the preprocessing of this many subjects to time its steps")
    args = ap.parse_args()
    truth = {r["participant_id"]: r for r in csv.DictReader(
        open(args.cohort / "derivatives/simulation/truth.tsv"), delimiter="\t")}
    ds = VolumeDataset(args.cache)
    f = {n: ds.features[:, k] for k, n in enumerate(ds.feature_names)}
    rows = [truth[p] for p in ds.participant_ids]
    tr = np.array([[float(r[k]) for k in ("gm_ml", "wm_ml", "csf_ml")] for r in rows])
    tr = tr / tr.sum(1, keepdims=True)
    est = np.c_[f["gm_fraction"], f["wm_fraction"], f["csf_fraction"]]
    sites = np.array(ds.sites)
    print(f"n = {len(ds)} subjects, {len(set(sites))} sites")
    print("| fraction | r pooled | r within site (mean) | mean est | mean true |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(("GM", "WM", "CSF")):
        within = np.mean([np.corrcoef(est[sites == s, k], tr[sites == s, k])[0, 1]
                          for s in sorted(set(sites))])
        print(f"| {name} | {np.corrcoef(est[:, k], tr[:, k])[0, 1]:.3f} | {within:.3f} | "
              f"{est[:, k].mean():.3f} | {tr[:, k].mean():.3f} |")
    vent = np.array([float(r["ventricle_ml"]) for r in rows])
    total = np.array([sum(float(r[k]) for k in ("gm_ml", "wm_ml", "csf_ml")) for r in rows])
    for name in ("ventricles_csf", "periventricular_csf"):
        print(f"{name} vs true ventricle fraction: r = "
              f"{np.corrcoef(f[name], vent / total)[0, 1]:.3f}")
    dice = f["template_dice"]
    print(f"template Dice: mean {dice.mean():.4f}, min {dice.min():.4f}")
    scale = f["affine_scale"]
    head = np.array([float(r["head_scale"]) for r in rows])
    print(f"affine scale vs 1/head_scale: r = {np.corrcoef(scale, 1 / head)[0, 1]:.4f}, "
          f"max abs rel err {np.max(np.abs(scale * head - 1)):.4f}")
    if args.timed:
        from rankcore.mri.preprocess import preprocess_file

        secs = []
        for r in rows[:args.timed]:
            pv = preprocess_file(args.cohort / r["path"], ds.view.config)
            secs.append([pv.tissue_seconds[k] for k in ("bias", "register", "em", "features")])
        s = np.array(secs)
        print(f"CPU s per subject over {len(s)} (mean / median): " + ", ".join(
            f"{n} {a:.2f}/{b:.2f}" for n, a, b in zip(_STEPS, s.mean(0), np.median(s, 0)))
              + f"; total {s.sum(1).mean():.2f}/{np.median(s.sum(1)):.2f}")
    age = ds.ages.astype(np.float64)
    site_codes = (sites[:, None] == np.array(sorted(set(sites)))[None, 1:]).astype(float)
    hist = []
    for i in range(len(ds)):
        v = ds.volume(i).astype(np.float32)
        inside = v != 0
        h, _ = np.histogram(v[inside], bins=24, range=(-3, 3))
        hist.append(h / inside.sum())
    feats = ds.features[:, [k for k, n in enumerate(ds.feature_names)
                            if n != "template_dice"]]
    for name, x in (("tissue features + site", np.c_[feats, site_codes]),
                    ("histogram (24 bins) + site", np.c_[np.array(hist), site_codes]),
                    ("true fractions + site", np.c_[tr, site_codes])):
        mae, a = _loo_ridge_mae(x, age)
        print(f"LOO ridge MAE, {name}: {mae:.2f} y (alpha {a})")


if __name__ == "__main__":
    main()
