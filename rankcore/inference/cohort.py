"""Apply a saved cascade to a new cohort: ingest with the model's preprocessing, predict, write.

Sequence of :func:`predict_cohort`:

1. Check everything that can be checked before any work: the output's extension (``.csv`` or
   ``.parquet``), the model folder, the expected ``spacing`` / ``shape`` if the caller states
   them (they must be the model's: a model/cohort mismatch is refused with what the model
   needs), and, with ``bias_correct``, the stored correction (MODEL_DIR/bias.json, written by
   ``brainrank evaluate``; it must belong to this model).
2. Read the cohort (BIDS root or manifest; ages optional) and ingest it into a cache with
   EXACTLY the model card's PreprocessConfig. The cache folder defaults to
   ``<out_file without extension>.cache`` next to the output, so a rerun reuses the
   preprocessed volumes; ``cache_dir`` chooses another (keep one cache per cohort: rows of
   other subjects in it are kept and ignored). Bad subjects are quarantined as ingest does.
3. Set aside subjects whose source voxels are coarser than ``max_spacing_ratio`` times the
   model's spacing (category ``spacing_mismatch``): upsampling cannot recreate the detail the
   model was trained on. When no subject is left, the run fails with a clear message.
4. Predict every remaining subject once (with ``engine="ray"`` as Ray tasks that read their
   own rows from the cache, on GPU workers when ``device="cuda"``; see
   :func:`rankcore.train.ray_predict.predict_ray`); write the predictions table (CSV or
   Parquet by extension): one row per predicted subject (``status`` "predicted") and one per
   subject set aside (``status`` its category, ``reason`` the message, no prediction); and
   ``<out_file without extension>.quarantine.csv`` (participant_id, key, source, category,
   message; header only when nothing was set aside).

The cohort may be a BIDS root, a manifest, one image file (.nii, .nii.gz, .mgz) or a folder
of images (:func:`rankcore.mri.read_cohort`); ages are optional. Preprocessing shows a
progress bar on a terminal (:mod:`rankcore.progress`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.conformal import load_interval
from rankcore.errors import InputError
from rankcore.inference.bias_store import load_bias
from rankcore.inference.engine import CascadeRunner, ray_running
from rankcore.inference.model import check_preprocess, describe_config, predict_cascade
from rankcore.inference.table import check_table_path, predictions_table, write_table
from rankcore.locations import local_path

__all__ = ["MISMATCH_CATEGORY", "PredictionSummary", "check_prediction", "default_cache_dir",
           "predict_cohort"]

log = logging.getLogger("rankcore.inference")

#: Quarantine category of subjects whose images are too coarse for the model.
MISMATCH_CATEGORY = "spacing_mismatch"
QUARANTINE_COLUMNS = ("participant_id", "key", "source", "category", "message")


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`predict_cohort` did.

    Attributes:
        out_file: the predictions table.
        quarantine_file: the subjects set aside, with the reason.
        cache_dir: the cache root used for preprocessing.
        total: cohort rows (including rows set aside while reading the table).
        predicted: subjects predicted (rows of ``out_file``).
        quarantined: count per category.
        bias_corrected: the ``corrected_*`` columns are filled.
        bias_method: their form (``"beheshti"`` or ``"cole"``), or None.
        preprocess: the model's preprocessing config (dict).
        seconds_ingest: wall time of the ingest step.
    """

    out_file: str
    quarantine_file: str
    cache_dir: str
    total: int
    predicted: int
    quarantined: dict[str, int]
    bias_corrected: bool
    bias_method: str | None
    preprocess: dict[str, Any]
    seconds_ingest: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "warnings": list(self.warnings),
                "n_quarantined": self.n_quarantined}


def default_cache_dir(out_file: str | Path) -> Path:
    """``predictions.csv`` -> ``predictions.cache`` in the same folder."""
    out = Path(out_file)
    return out.with_name(f"{out.stem}.cache")


def _quarantine_path(out_file: Path) -> Path:
    return out_file.with_name(f"{out_file.stem}.quarantine.csv")


def _locations(model_dir: str | Path, cohort: str | Path, out_file: str | Path,
               cache_dir: str | Path | None, bias_file: str | Path | None) -> tuple:
    """The five locations as paths (``file://`` URIs accepted, other URIs refused), before
    anything is read or written."""
    return (local_path(model_dir, "model_dir"), local_path(cohort, "cohort"),
            local_path(out_file, "out"),
            None if cache_dir is None else local_path(cache_dir, "cache"),
            None if bias_file is None else local_path(bias_file, "bias_file"))


def _check_method(method: str) -> str:
    if method not in ("beheshti", "cole"):
        raise InputError(f"`bias_method` must be 'beheshti' or 'cole', got {method!r}")
    return method


def _prepare(model_dir: str | Path, cohort: str | Path, out_file: Path, *, bias_correct: bool,
             bias_method: str, bias_file: str | Path | None, spacing: float | None, shape: Any,
             allow_outside_root: bool, device: str, max_spacing_ratio: float,
             on_ray: bool = False) -> tuple:
    """Every check that needs no preprocessing: (cascade, card, config, correction, cohort)."""
    from rankcore.mri import read_cohort
    from rankcore.train.cascade import load_cascade
    from rankcore.train.loop import resolve_device

    check_table_path(out_file, "out")
    _check_method(bias_method)
    if isinstance(max_spacing_ratio, bool) or not float(max_spacing_ratio) >= 1.0:
        raise InputError(f"`max_spacing_ratio` must be a number >= 1, got {max_spacing_ratio!r}")
    # With Ray, the forward passes run on the workers: the driver (maybe a CPU head) only
    # reads the card and checks the weights.
    cascade, card = load_cascade(model_dir, "cpu" if on_ray else resolve_device(device))
    config = check_preprocess(card, spacing=spacing, shape=shape)
    correction = None
    if bias_correct:
        correction = load_bias(bias_file if bias_file is not None else model_dir, card)
        if bias_method == "cole" and not correction.cole_defined:
            raise InputError(f"Cole's correction cannot be applied with this model: the fitted "
                             f"slope a = {correction.a:.4g} is not positive; use "
                             "--bias-method beheshti")
    parsed = read_cohort(cohort, allow_outside_root=allow_outside_root, require_age=False)
    return cascade, card, config, correction, parsed


def _mismatch_record(row: Any, coarsest: float, spacing: float,
                     ratio: float) -> dict[str, Any] | None:
    """The set-aside record of ``row`` when ``coarsest`` (mm) exceeds ``ratio`` x ``spacing``."""
    if coarsest <= ratio * spacing:
        return None
    return {"participant_id": row.participant_id, "key": row.key, "source": str(row.path),
            "category": MISMATCH_CATEGORY,
            "message": f"source voxels of {coarsest:.3g} mm are coarser than {ratio:g} x the "
                       f"model's {spacing:g} mm; the model was not trained on such images"}


def _spacing_mismatch(row: Any, spacing: float, ratio: float) -> dict[str, Any] | None:
    """:func:`_mismatch_record` from the image header's voxel sizes (None when unreadable:
    ingest then sets the file aside with its own category)."""
    import nibabel as nib

    try:
        affine = np.asarray(nib.load(str(row.path)).affine, dtype=np.float64)
    except Exception:  # any unreadable header: ingest names the problem
        return None
    voxels = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return _mismatch_record(row, float(voxels.max()), spacing, ratio)


def _with_set_aside(predicted: pa.Table, set_aside: list[dict[str, Any]]) -> pa.Table:
    """The predictions table with a ``status`` column (``"predicted"``, or the category of a
    subject set aside) and a ``reason`` column, and one row per subject set aside (no
    prediction), so that one table says what happened to every subject of the cohort."""
    n = predicted.num_rows
    table = predicted.append_column("status", pa.array(["predicted"] * n, pa.string()))
    table = table.append_column("reason", pa.array([None] * n, pa.string()))
    rows = [{"participant_id": q["participant_id"], "status": q["category"],
             "reason": q["message"], **({"source_path": q["source"]}
                                        if "source_path" in table.column_names else {})}
            for q in set_aside]
    if not rows:
        return table
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])


def check_prediction(model_dir: str | Path, cohort: str | Path, out_file: str | Path, *,
                     bias_correct: bool = False, bias_method: str = "beheshti",
                     bias_file: str | Path | None = None, spacing: float | None = None,
                     shape: Any = None, allow_outside_root: bool = False,
                     device: str = "cpu", max_spacing_ratio: float = 2.0,
                     engine: str = "local") -> int:
    """Check the inputs of :func:`predict_cohort` without preprocessing anything (with
    ``engine="ray"`` CUDA is not required here: the Ray workers check it).

    Returns:
        The number of cohort rows that will be preprocessed.

    Raises:
        InputError, CheckpointError: as :func:`predict_cohort` (before its ingest step).
    """
    model_dir, cohort, out_file, _, bias_file = _locations(model_dir, cohort, out_file, None,
                                                           bias_file)
    parsed = _prepare(model_dir, cohort, out_file, bias_correct=bias_correct,
                      bias_method=bias_method, bias_file=bias_file, spacing=spacing,
                      shape=shape, allow_outside_root=allow_outside_root, device=device,
                      max_spacing_ratio=max_spacing_ratio, on_ray=engine == "ray")[4]
    return len(parsed.rows)


def predict_cohort(model_dir: str | Path, cohort: str | Path, out_file: str | Path, *,
                   bias_correct: bool = False, bias_method: str = "beheshti",
                   bias_file: str | Path | None = None, cache_dir: str | Path | None = None,
                   spacing: float | None = None, shape: Any = None, workers: int = 1,
                   engine: str = "local", allow_outside_root: bool = False,
                   batch_size: int | None = None, device: str = "cpu",
                   max_spacing_ratio: float = 2.0,
                   allow_whole_head: bool = False) -> PredictionSummary:
    """Predict the brain age of every valid subject of ``cohort`` (see the module docstring).

    Args:
        model_dir: a folder written by :func:`rankcore.train.cascade.train_cascade`.
        cohort: BIDS root or manifest (.csv/.tsv/.parquet); ages are optional.
        out_file: the predictions table; ``.csv`` or ``.parquet`` (format by extension).
        bias_correct: fill ``corrected_age`` / ``corrected_gap`` with the stored correction.
        bias_method: ``"beheshti"`` (needs the age) or ``"cole"``.
        bias_file: a bias.json to use instead of MODEL_DIR/bias.json.
        cache_dir: preprocessing cache (None: :func:`default_cache_dir`).
        spacing, shape: what the caller expects the model to take (mm, voxels); refused
            unless they are the model's. None: no expectation.
        workers, engine: ingest parallelism (see :func:`rankcore.cache.ingest_cohort`); with
            ``"ray"`` the prediction also runs as ``workers`` Ray tasks at a time.
        allow_outside_root: accept manifest paths outside the manifest's folder.
        batch_size: subjects per forward pass (None: the card's).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (engine ray: ``"cuda"`` asks for GPU
            workers, checked on the workers).
        max_spacing_ratio: set aside sources whose largest voxel side exceeds this times the
            model's spacing.
        allow_whole_head: preprocess images that look like whole heads as they are (the
            model's config with ``allow_whole_head``, so a cache of its own) instead of
            setting them aside as ``not_skull_stripped``.

    ``model_dir``, ``cohort``, ``out_file``, ``cache_dir`` and ``bias_file`` are paths or
    ``file://`` URIs on a POSIX file system; any other URI is refused
    (:func:`rankcore.locations.local_path`). Engine ray needs the cache at a path every node
    sees.

    Returns:
        A :class:`PredictionSummary`.

    Raises:
        InputError: unusable arguments (an object-store URI included), a model/cohort
            mismatch, no stored correction when one is asked for, an unreadable cohort table,
            or no subject left to predict.
        CheckpointError: an unreadable model folder.
    """
    from rankcore.cache import VolumeDataset, ingest_cohort, open_cache
    from rankcore.train.data import SubjectData

    model_dir, cohort, out_file, cache_dir, bias_file = _locations(
        model_dir, cohort, out_file, cache_dir, bias_file)
    cascade, card, config, correction, parsed = _prepare(
        model_dir, cohort, out_file, bias_correct=bias_correct, bias_method=bias_method,
        bias_file=bias_file, spacing=spacing, shape=shape,
        allow_outside_root=allow_outside_root, device=device,
        max_spacing_ratio=max_spacing_ratio, on_ray=engine == "ray")
    if allow_whole_head and not config.allow_whole_head:
        config = replace(config, allow_whole_head=True)
    for stray in out_file.parent.glob(f".{out_file.name}.*.tmp"):  # a killed earlier run's
        stray.unlink(missing_ok=True)
    cache = cache_dir if cache_dir is not None else default_cache_dir(out_file)
    log.info("predicting %d subject-session(s) of %s with %s; preprocessing (%s) into %s",
             len(parsed.rows), cohort, model_dir, describe_config(config), cache)
    from rankcore.progress import progress_bar

    # Too-coarse images are set aside from their headers, before preprocessing could fail on
    # them for another reason (e.g. tissue classification) and hide the real one.
    screened = [_spacing_mismatch(row, config.spacing, max_spacing_ratio) for row in parsed.rows]
    early = [m for m in screened if m is not None]
    parsed = replace(parsed, rows=tuple(r for r, m in zip(parsed.rows, screened) if m is None))
    with progress_bar("preprocessing", len(parsed.rows)) as bar:
        ingest = ingest_cohort(parsed, cache, config, engine=engine, workers=workers,
                               prune=False, progress=bar)

    view = open_cache(cache, config)
    quarantine = pq.read_table(view.layout.quarantine_path).to_pylist() \
        if view.layout.quarantine_path.exists() else []
    bad_keys = {q["key"] for q in quarantine if q.get("key")}
    position = {k: i for i, k in enumerate(view.keys)}
    sources = view.table.column("source_path").to_pylist()
    source_spacing = view.table.column("source_spacing").to_pylist()
    rows, set_aside = [], early
    for row in parsed.rows:
        i = position.get(row.key)
        if i is None or row.key in bad_keys:
            continue  # quarantined by ingest (listed in its table)
        if os.path.realpath(sources[i]) != os.path.realpath(row.path):
            raise InputError(f"cache {str(cache)!r} holds another image for {row.key} "
                             f"({sources[i]}): give --cache a folder of its own for this cohort")
        mismatch = _mismatch_record(row, max(source_spacing[i] or [0.0]), config.spacing,
                                    max_spacing_ratio)
        if mismatch is not None:
            set_aside.append(mismatch)
            continue
        rows.append(i)
    q_rows = [{c: q.get(c) for c in QUARANTINE_COLUMNS} for q in quarantine] + set_aside
    counts: dict[str, int] = {}
    for q in q_rows:
        counts[q["category"]] = counts.get(q["category"], 0) + 1
    q_file = _quarantine_path(out_file)
    write_table(pa.Table.from_pylist(q_rows, schema=pa.schema(
        [(c, pa.string()) for c in QUARANTINE_COLUMNS])), q_file)
    if not rows:
        mismatch = f"; {len(set_aside)} set aside as a model/cohort mismatch (images coarser " \
                   f"than the model's {config.spacing:g} mm grid)" if set_aside else ""
        raise InputError(f"no subject of {str(cohort)!r} could be predicted: "
                         f"{len(q_rows)} of {ingest.total} set aside{mismatch}; see {q_file}")

    table = view.table
    ages = np.asarray(table.column("age").to_numpy(zero_copy_only=False), dtype=np.float64)[rows]
    if engine == "ray":
        runner = CascadeRunner(model_dir.absolute(), card, cascade,
                               "ray", workers, device, batch_size)
        with ray_running("ray", workers):
            stage1, final = runner.ages_of_keys(cache, [view.keys[i] for i in rows],
                                                config.to_dict())
    else:
        data = SubjectData.from_dataset(VolumeDataset(cache, config), preload=False).subset(rows)
        stage1, final = predict_cascade(cascade, card, data, batch_size=batch_size)
    col = {c: table.column(c).to_pylist() for c in ("participant_id", "session", "site", "sex")}
    out = predictions_table(
        [col["participant_id"][i] for i in rows], [col["session"][i] for i in rows],
        [col["site"][i] for i in rows], ages, stage1, final, correction=correction,
        method=bias_method, extra={"sex": [col["sex"][i] for i in rows],
                                   "source_path": [sources[i] for i in rows]},
        interval=load_interval(card))
    write_table(_with_set_aside(out, q_rows), out_file)
    warnings = []
    if bias_correct and bias_method == "beheshti" and not np.isfinite(ages).all():
        warnings.append(f"{int((~np.isfinite(ages)).sum())} subject(s) have no age: their "
                        "Beheshti-corrected values are empty (Cole's form needs no age)")
    log.info("wrote %d prediction(s) to %s; %d subject(s) set aside (%s)", len(rows), out_file,
             len(q_rows), q_file)
    return PredictionSummary(
        out_file=str(out_file), quarantine_file=str(q_file), cache_dir=str(cache),
        total=ingest.total, predicted=len(rows), quarantined=counts,
        bias_corrected=bias_correct, bias_method=bias_method if bias_correct else None,
        preprocess=config.to_dict(), seconds_ingest=ingest.seconds, warnings=tuple(warnings))

