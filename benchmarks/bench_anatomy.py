"""What the simulator's anatomy switch does to closed-form brain-age features.

Simulates the same subjects (seed, 2 mm) with and without per-subject anatomy and fits, by
10-fold cross-validation, ridge regressions of age on:

    truth      the TRUE tissue fractions of truth.tsv (GM, WM, CSF, ventricles / ICV) + site:
               a sanity row; the warp is volume-preserving, so it should not move
    template   template-regional image features after an IDEAL affine registration (the true
               head pose from truth.tsv, inverted): per octant, mean intensity in the
               template's GM and CSF regions relative to the octant's WM; the ventricle
               region's; the correlation of the image with the template's GM map; + site

Usage::

    .venv/bin/python benchmarks/bench_anatomy.py --subjects 60 --work /tmp/bench_anatomy

Prints one Markdown table: MAE, SRCC and MAE / floor per feature set, anatomy on and off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rankcore.mri.ageing import age_tissue
from rankcore.mri.mni import template_maps
from rankcore.mri.scanner import head_pose
from rankcore.mri.simulate import read_truth, simulate_cohort


def _floats(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split(",")])


def _sites(rows: list[dict[str, str]]) -> np.ndarray:
    names = sorted({r["site"] for r in rows})
    return np.array([[r["site"] == n for n in names[1:]] for r in rows], dtype=float)


def truth_features(rows: list[dict[str, str]]) -> np.ndarray:
    vol = np.array([[float(r[k]) for k in ("gm_ml", "wm_ml", "csf_ml", "ventricle_ml")]
                    for r in rows])
    icv = vol[:, :3].sum(axis=1, keepdims=True)
    return np.hstack([vol / icv, _sites(rows)])


def _octants(tpl, idx: np.ndarray) -> np.ndarray:
    """Octant (0-7) of each template voxel about the brain centre (left/right, front/back, ...)."""
    world = idx * tpl.spacing + tpl.affine[:3, 3]
    return ((world > tpl.brain_centre) * [1, 2, 4]).sum(axis=1)


def template_features(root: Path, rows: list[dict[str, str]], spacing: float) -> np.ndarray:
    """Template-regional intensities of each image after an ideal affine registration.

    Per octant of the brain: mean intensity in the template's GM (> 0.5) and CSF (> 0.5, not
    ventricle) regions relative to the median in its WM (> 0.9) region (a local reference
    that cancels most of the bias field); the lateral-ventricle region's mean relative to all
    WM; the correlation of the image with the template's GM map; and the site.
    """
    tpl = template_maps(spacing)
    idx = np.argwhere(tpl.mask >= 0.5)
    world = idx * tpl.spacing + tpl.affine[:3, 3]
    at = tuple(idx.T)
    octant = _octants(tpl, idx)
    ventricles = age_tissue(tpl, 25.0).ventricles[at] > 0.5
    gm, wm, csf = tpl.gm[at] > 0.5, tpl.wm[at] > 0.9, (tpl.csf[at] > 0.5) & ~ventricles
    out = []
    for r in rows:
        img = nib.load(root / r["path"])
        pose = head_pose(tpl.brain_centre, float(r["head_scale"]), _floats(r["rotation_deg"]),
                         _floats(r["translation_mm"]))
        to_vox = np.linalg.inv(img.affine) @ pose
        ijk = world @ to_vox[:3, :3].T + to_vox[:3, 3]
        v = ndi.map_coordinates(img.get_fdata(dtype=np.float32), ijk.T, order=1,
                                prefilter=False)
        feats = [np.corrcoef(v, tpl.gm[at])[0, 1], v[ventricles].mean() / np.median(v[wm])]
        for k in range(8):
            here = octant == k
            ref = np.median(v[here & wm])
            feats += [v[here & gm].mean() / ref, v[here & csf].mean() / ref]
        out.append(feats)
    return np.hstack([np.array(out), _sites(rows)])


def cv_scores(x: np.ndarray, age: np.ndarray, brain_age: np.ndarray, seed: int,
              ) -> tuple[float, float, float]:
    """(MAE, SRCC, MAE / floor) of 10-fold cross-validated ridge predictions."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    pred = cross_val_predict(model, x, age, cv=KFold(10, shuffle=True, random_state=seed))
    mae = float(np.mean(np.abs(pred - age)))
    floor = float(np.mean(np.abs(brain_age - age)))
    return mae, float(spearmanr(pred, age)[0]), mae / floor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", default="/tmp/bench_anatomy")
    args = ap.parse_args(argv)
    lines = ["| anatomy | features | MAE (y) | SRCC | MAE/floor |", "|---|---|---|---|---|"]
    for on in (False, True):
        root = Path(args.work) / f"cohort-s{args.seed}-n{args.subjects}-{'on' if on else 'off'}"
        t0 = time.perf_counter()
        simulate_cohort(root, args.subjects, args.seed, spacing=args.spacing, quirks=False,
                        anatomy=on, workers=args.workers)
        rows = read_truth(root)
        age = np.array([float(r["age_exact"]) for r in rows])
        brain_age = np.array([float(r["brain_age"]) for r in rows])
        for name, x in (("true tissue fractions", truth_features(rows)),
                        ("template features, ideal affine",
                         template_features(root, rows, args.spacing))):
            mae, srcc, ratio = cv_scores(x, age, brain_age, args.seed)
            lines.append(f"| {'on' if on else 'off'} | {name} | {mae:.2f} | {srcc:.3f} | "
                         f"{ratio:.2f} |")
        print(f"anatomy {'on' if on else 'off'}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n## bench_anatomy: {args.subjects} subjects, seed {args.seed}, "
          f"{args.spacing:g} mm, floor {np.mean(np.abs(brain_age - age)):.2f} y\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
