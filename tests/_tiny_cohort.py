"""Tiny real caches for the cascade tests: NIfTI files -> rankcore ingest -> Parquet cache.

Each head is a 30x34x26 volume at 2 mm (a bright box with a brighter sphere whose radius grows
with age, plus noise), cached at 4 mm on a (12, 14, 10) grid: real files, real ingest, and
an image in which age is visible, so two epochs already learn something.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from rankcore.cache import ingest_cohort
from rankcore.mri.types import Cohort, CohortRow, PreprocessConfig

PREPROCESS = PreprocessConfig(spacing=4.0, shape=(12, 14, 10), max_voxels=50_000,
                              tissue=False)  # box phantoms: no tissue to classify
_SRC_SHAPE = (30, 34, 26)


def _head(age: float, rng: np.random.Generator) -> np.ndarray:
    vol = np.zeros(_SRC_SHAPE, np.float32)
    vol[4:26, 4:30, 3:23] = 60.0
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in _SRC_SHAPE], indexing="ij"))
    centre = np.array(_SRC_SHAPE)[:, None, None, None] / 2 + rng.uniform(-1, 1, (3, 1, 1, 1))
    radius = 3.0 + 5.0 * (age - 20.0) / 60.0
    vol[((grid - centre) ** 2).sum(0) <= radius**2] = 160.0
    return vol + rng.normal(0, 3, _SRC_SHAPE).astype(np.float32)


def make_cache(root: Path, n: int, *, seed: int = 0, ages: Sequence[float | None] | None = None,
               splits: Sequence[str | None] | None = None, corrupt: int = 0) -> Path:
    """Write ``n`` heads (and ``corrupt`` broken files) under ``root/src``, ingest into
    ``root/cache``; return the cache root. Ages default to uniform 20-80 (one decimal)."""
    rng = np.random.default_rng(seed)
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    if ages is None:
        ages = np.round(rng.uniform(20, 80, n), 1).tolist()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -34.0, -26.0]
    rows = []
    for i in range(n):
        path = src / f"sub-{i:02d}_T1w.nii.gz"
        age = ages[i]
        nib.save(nib.Nifti1Image(_head(50.0 if age is None else age, rng), affine), path)
        rows.append(CohortRow(f"sub-{i:02d}", path, age=age, sex="F" if i % 2 else "M",
                              site="ab"[i % 2], split=None if splits is None else splits[i]))
    for j in range(corrupt):
        path = src / f"sub-x{j}_T1w.nii.gz"
        path.write_bytes(b"\x1f\x8b\x08 truncated gzip")
        rows.append(CohortRow(f"sub-x{j}", path, age=40.0))
    cache = root / "cache"
    ingest_cohort(Cohort(src, "manifest", tuple(rows)), cache, PREPROCESS)
    return cache


def write_manifest(root: Path, n: int, *, seed: int = 0,
                   splits: Sequence[str] | None = None) -> Path:
    """Write ``n`` heads under ``root`` and a manifest.csv (participant_id, path, age, sex,
    site, and ``split`` when ``splits`` is given) for `brainrank ingest`; return its path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -34.0, -26.0]
    lines = ["participant_id,path,age,sex,site" + (",split" if splits is not None else "")]
    for i, age in enumerate(np.round(rng.uniform(20, 80, n), 1)):
        nib.save(nib.Nifti1Image(_head(float(age), rng), affine), root / f"sub-{i:02d}.nii.gz")
        row = f"sub-{i:02d},sub-{i:02d}.nii.gz,{age},{'FM'[i % 2]},{'ab'[i % 2]}"
        lines.append(row + (f",{splits[i]}" if splits is not None else ""))
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def ingest_manifest(manifest: Path, cache: Path) -> Path:
    """Ingest a :func:`write_manifest` cohort into ``cache`` at :data:`PREPROCESS` (tissue off:
    the box phantoms have no tissue to classify, which `brainrank ingest` would require)."""
    from rankcore.mri import read_cohort

    ingest_cohort(read_cohort(manifest), cache, PREPROCESS)
    return cache
