"""Separation of skull-stripped brains and whole heads by :mod:`rankcore.mri.whole_head`.

Skull-stripped: simulated subjects (:mod:`rankcore.mri.phantom`) at working spacings
``--spacings``, every site of ``--sites`` and every file quirk (orientation, fine/anisotropic/
oblique grids, dtypes), plus nilearn's brain-extracted MNI ICBM152 2009 T1.
Whole heads: the same simulated brains wrapped by :func:`rankcore.mri.head_phantom.add_head`
with layers drawn at random (CSF 1-3 mm, skull 3-9 mm with or without bright marrow, scalp
3-9 mm at 0.6-1.4 of WM, with or without a neck, noisy or exactly-zero background), plus,
when given, real whole-head images (``--heads FILE ...``, e.g. a mean head template).

Prints one row per image (kind, name, head_ml, shell_contrast, outside_ml, verdict) and, per
kind, the range of each measure and the misclassification count.

    python benchmarks/bench_whole_head.py --subjects 12 --spacings 1,1.5,2,3
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import nibabel as nib
import numpy as np

from rankcore.mri.head_phantom import HeadLayers, add_head
from rankcore.mri.phantom import SimulationConfig, render_subject, sample_subject
from rankcore.mri.whole_head import volume_evidence


def _layers(rng: np.random.Generator) -> HeadLayers:
    return HeadLayers(
        csf_mm=float(rng.uniform(1, 3)), skull_mm=float(rng.uniform(3, 9)),
        scalp_mm=float(rng.uniform(3, 9)), csf=float(rng.uniform(0.1, 0.3)),
        bone=float(rng.uniform(0.03, 0.15)),
        marrow=float(rng.choice([0.0, rng.uniform(0.4, 0.9)])),
        scalp=float(rng.uniform(0.6, 1.4)),
        neck=None if rng.random() < 0.3 else float(rng.uniform(0.4, 0.7)),
        snr=float(rng.uniform(15, 40)),
        background="zero" if rng.random() < 0.4 else "noise")


def _row(kind: str, name: str, data, affine, spacing: float, rows: list) -> None:
    t = time.process_time()
    ev = volume_evidence(np.asarray(data, dtype=np.float32), affine, spacing)
    rows.append((kind, name, ev, time.process_time() - t))
    print(f"{kind:9s} {name:38s} head {ev.head_ml:7.0f} ml  shell {ev.shell_contrast:5.2f}  "
          f"outside {ev.outside_ml:6.0f} ml  {'WHOLE HEAD' if ev.whole_head else 'brain'}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=8, help="simulated subjects per spacing")
    ap.add_argument("--spacings", default="1,1.5,2,3", help="working spacings (mm)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--target", type=float, default=2.0, help="preprocessing spacing (mm)")
    ap.add_argument("--heads", nargs="*", default=[], help="real whole-head images")
    args = ap.parse_args()
    rows: list = []
    rng = np.random.default_rng(0)
    for sp in (float(s) for s in args.spacings.split(",")):
        cfg = SimulationConfig(subjects=args.subjects, seed=int(sp * 10), spacing=sp,
                               sites=args.sites)
        for i in range(args.subjects):
            params = sample_subject(cfg, i)
            img, _, _ = render_subject(params, sp)
            tag = f"{sp:g}mm s{params.site_index + 1} {params.grid} {params.orientation}"
            _row("stripped", tag, img.dataobj, img.affine, args.target, rows)
            ras = dataclasses.replace(params, orientation="RAS", grid="iso", dtype="float32")
            img, _, _ = render_subject(ras, sp)
            layers = _layers(rng)
            head, affine = add_head(np.asarray(img.dataobj), img.affine, layers, seed=i)
            tag = (f"{sp:g}mm s{params.site_index + 1} skull {layers.skull_mm:.0f} scalp "
                   f"{layers.scalp_mm:.0f}@{layers.scalp:.1f} {layers.background}")
            _row("head", tag, head, affine, args.target, rows)
    from rankcore.mri.mni import _FILES, _data_dir  # nilearn's brain-extracted template

    mni = nib.load(str(_data_dir() / _FILES["t1"]))
    _row("stripped", "nilearn MNI152 2009 T1 (brain)", mni.dataobj, mni.affine, args.target,
         rows)
    for path in args.heads:
        img = nib.load(path)
        _row("head", path[-38:], img.dataobj, img.affine, args.target, rows)
    print()
    for kind in ("stripped", "head"):
        sel = [r for r in rows if r[0] == kind]
        wrong = sum(r[2].whole_head != (kind == "head") for r in sel)
        for field in ("head_ml", "shell_contrast", "outside_ml"):
            v = np.array([getattr(r[2], field) for r in sel])
            print(f"{kind:9s} n={len(sel):3d} {field:15s} min {v.min():8.2f} "
                  f"median {np.median(v):8.2f} max {v.max():8.2f}")
        cpu = np.array([r[3] for r in sel])
        print(f"{kind:9s} misclassified {wrong} of {len(sel)}; CPU s per image median "
              f"{np.median(cpu):.2f} max {cpu.max():.2f}")


if __name__ == "__main__":
    main()
