"""Simulated BIDS-style T1 cohort made from the MNI ICBM152 2009 template (the default cohort).

Each subject i has chronological age ``age`` (uniform over ``age_range``) and brain age
``brain_age = age + delta``, ``delta ~ N(0, sigma_delta)``. Its brain is the template aged to
``brain_age`` (``rankcore.mri.ageing``: GM loss, WM inverted U, ventricle growth with a
subject multiplier), then scanned (``rankcore.mri.scanner``) with nuisances a good model must
ignore (head size and pose, bias field, noise, site effects) and, with ``quirks``, file quirks
(orientation, voxel grid, dtype with scl_slope, .nii/.nii.gz) that ingest must handle; see
``rankcore.mri.phantom``. With ``anatomy`` (the default) each brain is also deformed by its
own smooth, volume-preserving warp (``rankcore.mri.anatomy``). Subject i's file is
byte-identical whatever the number of subjects.

Layout written under OUT_DIR::

    dataset_description.json, participants.tsv (participant_id, age, sex, site),
    participants.json, sub-XXXX/anat/sub-XXXX_T1w.nii[.gz],
    derivatives/simulation/{dataset_description.json, simulation.json, truth.tsv}

``truth.tsv`` (true brain age, nuisance values, tissue volumes as rendered, i.e. after the
anatomy warp, the warp's RMS and largest displacement in mm, expected quarantine category of
the broken files) is for reporting only: no training or evaluation code reads it, except
through ``irreducible_floor`` (the MAE of a perfect brain-age model) that evaluation may print.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.mri.ageing import AgedTissue
from rankcore.mri.mni import template_maps
from rankcore.mri.phantom import (
    SimulationConfig,
    SubjectParams,
    participant_id,
    render_subject,
    sample_subject,
)
from rankcore.mri.scanner import CORRUPTIONS, corrupt, encode

__all__ = ["TRUTH_RELPATH", "SimulationConfig", "SubjectParams", "irreducible_floor",
           "participant_id", "read_truth", "render_subject", "sample_subject",
           "simulate_cohort"]

logger = logging.getLogger("rankcore.mri.simulate")

#: Bumped whenever the simulator's output changes for the same config.
SIMULATOR_VERSION = "3"
TRUTH_RELPATH = Path("derivatives") / "simulation" / "truth.tsv"
_STATE_RELPATH = Path("derivatives") / "simulation" / "simulation.json"


def _fmt(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}"


def _truth_row(params: SubjectParams, tissue: AgedTissue, voxel: tuple[float, ...],
               relpath: Path) -> dict[str, str]:
    v = params.head_scale**3
    return {
        "participant_id": params.participant_id, "age": params.age_text,
        "age_exact": _fmt(params.age), "brain_age": _fmt(params.brain_age),
        "delta": _fmt(params.delta), "sex": params.sex, "site": params.site,
        "head_scale": _fmt(params.head_scale),
        "ventricle_multiplier": _fmt(params.ventricle_multiplier),
        "gm_ml": _fmt(tissue.gm_ml * v, 1), "wm_ml": _fmt(tissue.wm_ml * v, 1),
        "csf_ml": _fmt(tissue.csf_ml * v, 1), "ventricle_ml": _fmt(tissue.ventricle_ml * v, 2),
        "warp_sd_mm": _fmt(tissue.warp_sd_mm, 3), "warp_max_mm": _fmt(tissue.warp_max_mm, 3),
        "snr": _fmt(params.snr, 2),
        "rotation_deg": ",".join(_fmt(a, 3) for a in params.rotation_deg),
        "translation_mm": ",".join(_fmt(a, 3) for a in params.translation_mm),
        "orientation": params.orientation, "grid": params.grid,
        "voxel_mm": "x".join(f"{a:g}" for a in voxel), "dtype": params.dtype,
        "path": relpath.as_posix(), "corruption": "n/a", "expected_category": "n/a",
    }


def _write_atomic(path: Path, blob: bytes) -> None:
    """Write to a temporary sibling then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_subject(out_dir: Path, cfg: SimulationConfig, index: int) -> dict[str, str]:
    """Simulate and write subject ``index``; return its truth row (runs in worker threads)."""
    params = sample_subject(cfg, index)
    img, tissue, voxel = render_subject(params, cfg.spacing)
    _write_atomic(out_dir / params.relpath, encode(img, params.extension))
    return _truth_row(params, tissue, voxel, params.relpath)


def _write_broken(out_dir: Path, cfg: SimulationConfig, j: int) -> dict[str, str]:
    """Write the j-th deliberately broken file; return its truth row."""
    kinds = tuple(CORRUPTIONS)
    kind = kinds[j % len(kinds)]
    # A subject index far beyond any cohort size, so broken files do not depend on `subjects`.
    params = replace(sample_subject(cfg, 10**7 + j), participant_id=f"sub-broken{j + 1:02d}",
                     orientation="RAS", dtype="float32", grid="iso")
    img, tissue, voxel = render_subject(params, cfg.spacing)
    blob, ext = corrupt(img, kind)
    params = replace(params, extension=ext)
    _write_atomic(out_dir / params.relpath, blob)
    row = _truth_row(params, tissue, voxel, params.relpath)
    row.update(corruption=kind, expected_category=CORRUPTIONS[kind])
    return row


def _write_tsv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> None:
    lines = ["\t".join(columns)] + ["\t".join(r[c] for c in columns) for r in rows]
    _write_atomic(path, ("\n".join(lines) + "\n").encode())


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _state(cfg: SimulationConfig, complete: bool, files: list[str]) -> dict[str, Any]:
    return {"simulator_version": SIMULATOR_VERSION, "config": cfg.to_dict(),
            "complete": complete, "files": files}


def _prepare(out: Path, cfg: SimulationConfig) -> bool:
    """Check ``out``; return True when it already holds this exact, complete simulation.

    Never deletes anything: a folder holding other files, or a simulation made with other
    parameters, is refused.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"`out_dir` must be a folder, got the file {out}")
    if not out.exists() or not any(out.iterdir()):
        return False
    state_path = out / _STATE_RELPATH
    if not state_path.is_file():
        raise InputError(f"`out_dir` must be empty or hold a previous simulation, got the "
                         f"non-empty folder {out} without {_STATE_RELPATH}")
    try:
        state = json.loads(state_path.read_text())
        same = (state["simulator_version"] == SIMULATOR_VERSION
                and SimulationConfig.from_dict(state["config"]) == cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"`out_dir` must hold a readable {_STATE_RELPATH}, got {err}") from None
    if not same:
        raise InputError(f"`out_dir` must be empty or hold a simulation with the same "
                         f"parameters, got {out} made with {state.get('config')} (simulator "
                         f"version {state.get('simulator_version')}); use another folder")
    return bool(state.get("complete")) and all((out / f).is_file() for f in state["files"])


def _dataset_description(cfg: SimulationConfig) -> dict[str, Any]:
    return {
        "Name": f"brainrank simulated T1w cohort (seed {cfg.seed}, {cfg.subjects} subjects)",
        "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "CC0",
        "Authors": ["brainrank simulator"],
        "GeneratedBy": [{"Name": "brainrank simulate", "Version": SIMULATOR_VERSION,
                         "Description": f"config {json.dumps(cfg.to_dict(), sort_keys=True)}"}],
        "SourceDatasets": [{"URL": "https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009",
                            "Version": "ICBM 2009a nonlinear symmetric (via nilearn)"}],
    }


def simulate_cohort(out_dir: str | os.PathLike, subjects: int = 200, seed: int = 0, *,
                    spacing: float = 2.0, age_range: tuple[float, float] = (20.0, 85.0),
                    sites: int = 3, sigma_delta: float = 2.5, quirks: bool = True,
                    corrupt: int = 0, workers: int = 1, anatomy: bool = True,
                    warp_sd_mm: float = 2.5) -> Path:
    """Write a simulated BIDS-style cohort into ``out_dir`` and return ``out_dir``.

    Idempotent: rerunning with the same parameters on a complete simulation returns at once;
    on an interrupted one it rewrites every file (same bytes). A non-empty folder that is not
    a simulation with the same parameters is refused (InputError); nothing is deleted.

    Args:
        out_dir: cohort root to create (or an empty folder).
        subjects: number of valid subjects; seed: random seed.
        spacing: working voxel size (mm); age_range: ages (years) drawn uniformly.
        sites: number of scanners; sigma_delta: SD (years) of brain age - age.
        quirks: vary file orientation, grid, dtype and extension; corrupt: extra broken files.
        workers: threads to use (output does not depend on it).
        anatomy: deform each subject's anatomy by its own smooth random warp (the truth
            table records the warped volumes and the warp's size); warp_sd_mm: its RMS
            displacement per axis (mm).

    Returns:
        ``Path(out_dir)``.
    """
    cfg = SimulationConfig(subjects=subjects, seed=seed, spacing=spacing, age_range=age_range,
                           sites=sites, sigma_delta=sigma_delta, quirks=quirks, corrupt=corrupt,
                           anatomy=anatomy, warp_sd_mm=warp_sd_mm)
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise InputError(f"`workers` must be an integer >= 1, got {workers!r}")
    out = Path(out_dir)
    if _prepare(out, cfg):
        logger.info("%s already holds this simulation (seed %d, %d subjects); nothing to do",
                    out, cfg.seed, cfg.subjects)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / _STATE_RELPATH, _state(cfg, False, []))
    start = time.perf_counter()
    template_maps(cfg.spacing)  # build the cached maps once, before any worker thread
    rows = _run_subjects(out, cfg, int(workers), start)
    rows += [_write_broken(out, cfg, j) for j in range(cfg.corrupt)]

    _write_json(out / "dataset_description.json", _dataset_description(cfg))
    _write_tsv(out / "participants.tsv", rows, ["participant_id", "age", "sex", "site"])
    _write_json(out / "participants.json", {
        "age": {"Description": "age at scan", "Units": "year",
                "Notes": "some ages are whole years (age at last birthday); 89+ is censored"},
        "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "scanner site"}})
    columns = list(rows[0])
    _write_tsv(out / TRUTH_RELPATH, rows, columns)
    _write_json(out / "derivatives" / "simulation" / "dataset_description.json", {
        "Name": "simulation truth (not for training or evaluation)", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "brainrank simulate", "Version": SIMULATOR_VERSION}]})
    files = [r["path"] for r in rows] + ["participants.tsv", TRUTH_RELPATH.as_posix()]
    _write_json(out / _STATE_RELPATH, _state(cfg, True, files))
    logger.info("simulated %d subjects (+%d broken files) into %s in %.1f s; irreducible "
                "floor (MAE brain age vs age) %.2f y", cfg.subjects, cfg.corrupt, out,
                time.perf_counter() - start, irreducible_floor(out / TRUTH_RELPATH))
    return out


def _run_subjects(out: Path, cfg: SimulationConfig, workers: int, start: float,
                  ) -> list[dict[str, str]]:
    n, every = cfg.subjects, max(1, cfg.subjects // 10)
    rows: list[dict[str, str]] = []

    def progress(k: int) -> None:
        if k % every == 0 or k == n:
            logger.info("simulated %d/%d subjects (%.1f s)", k, n, time.perf_counter() - start)

    if workers == 1 or n == 1:
        for i in range(n):
            rows.append(_write_subject(out, cfg, i))
            progress(i + 1)
        return rows
    # Threads, not processes: the heavy steps (scipy.ndimage interpolation and filters,
    # numpy arithmetic and random draws, zlib) release the GIL, the cached template maps are
    # shared, and nothing is forked from a process that may run other threads (Prefect).
    with ThreadPoolExecutor(max_workers=min(workers, n),
                            thread_name_prefix="simulate") as pool:
        futures = [pool.submit(_write_subject, out, cfg, i) for i in range(n)]
        for k, fut in enumerate(futures, start=1):
            rows.append(fut.result())
            progress(k)
    return rows


def read_truth(truth_table_path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a simulation's truth.tsv (all values as text, "n/a" for missing)."""
    path = Path(truth_table_path)
    if path.is_dir():
        path = path / TRUTH_RELPATH
    if not path.is_file():
        raise InputError(f"`truth_table_path` must be a simulation's truth.tsv (or its cohort "
                         f"root), got {truth_table_path}")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def irreducible_floor(truth_table_path: str | os.PathLike) -> float:
    """MAE (years) between true brain age and the reported age: what a perfect model scores.

    Broken files (``corruption`` set) are left out. Accepts the truth.tsv or the cohort root.
    """
    errors = []
    for row in read_truth(truth_table_path):
        if row.get("corruption", "n/a") != "n/a":
            continue
        age = 89.0 if row["age"] == "89+" else float(row["age"])
        errors.append(abs(float(row["brain_age"]) - age))
    if not errors:
        raise InputError(f"`truth_table_path` must list at least one valid subject, got none "
                         f"in {truth_table_path}")
    return float(np.mean(errors))
