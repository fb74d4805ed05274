"""Evaluate a trained cascade on one split of a cache and write the report folder.

REPORT_DIR (written as a temporary sibling folder, then renamed into place: a reader sees the
old report or the new one, never half of one)::

    metrics.json            n, mae, rmse, pearson_r, srcc, r2, mean_bias, gap_age_corr, each
                            with a 95 % bootstrap interval; stage1; bias_corrected; per_site;
                            floor (simulated cohorts); provenance
    predictions.csv         one row per evaluated subject (rankcore.inference.table)
    bias.json               the validation-fitted correction (also stored in MODEL_DIR)
    pred_vs_age.png, gap_vs_age.png, site_gap.png, training_curves.png
    report.md, report.html  (the HTML embeds the figures: one self-contained file)

The bias correction is fitted on the model's VALIDATION subjects (the card's split), predicted
here with the same code as the evaluated split; it never sees the evaluated subjects unless
the user evaluates the validation split itself (reported as in-sample). When the validation
subjects are not available (another cohort's cache and no training cache), the correction
stored in MODEL_DIR/bias.json by an earlier evaluation is used, else none is reported.

Both predictions (the evaluated split, the validation subjects) run where ``engine`` says
(:mod:`rankcore.inference.engine`): in this process, or as Ray tasks on the workers that read
their own rows from the cache (this process then reads no volume for them; the QC page reads
the volumes of the subjects it draws, one at a time).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rankcore._io import remove_leftovers
from rankcore.bias import BiasCorrection, fit_bias_correction
from rankcore.conformal import interval_coverage, load_interval
from rankcore.errors import InputError
from rankcore.inference.bias_store import BIAS_FILE, load_bias, save_bias
from rankcore.inference.engine import (
    CascadeRunner,
    check_engine_workers,
    load_runner,
    ray_running,
)
from rankcore.inference.model import describe_config, model_preprocess
from rankcore.inference.table import predictions_table, write_table
from rankcore.locations import local_path
from rankcore.report._files import (
    CURVES_FILE,
    METRICS_FILE,
    copy_curves,
    json_safe,
    prepare_out_dir,
    swap_in,
)
from rankcore.report.eval_inputs import (
    ALL_SPLITS,
    data_digest,
    open_model_cache,
    read_subjects,
    split_rows,
)
from rankcore.report.floor import simulated_floor
from rankcore.report.metrics_table import build_metrics
from rankcore.report.plots import plot_gap_vs_age, plot_pred_vs_age, plot_site_boxes
from rankcore.report.qc import QC_FILE, QCSubject, render_qc
from rankcore.report.render import Figure, render_html, render_markdown, report_blocks
from rankcore.train.card_info import read_split_record

__all__ = ["ALL_SPLITS", "Evaluation", "check_evaluation", "evaluate_model"]

log = logging.getLogger("rankcore.report")


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_model` wrote.

    Attributes:
        out_dir: the report folder.
        metrics: the content of metrics.json.
        files: file name -> path of every file written.
        summary_markdown: the report without figures (for a Prefect markdown artifact).
        warnings: things a reader must know (in-sample evaluation, no correction, ...).
    """

    out_dir: Path
    metrics: dict[str, Any]
    files: dict[str, str]
    summary_markdown: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _validation_correction(runner: CascadeRunner, model_dir: Path, cache_dir: str | Path,
                           view: Any, data: Any, config: Any
                           ) -> tuple[BiasCorrection | None, str, tuple[str, ...]]:
    """Fit the correction on the card's validation subjects (or load the stored one).

    The validation subjects are looked up only in a cache holding exactly the training data
    (its data digest equals the card's): the evaluated cache, else the training cache named in
    the card. Matching by id alone could pick another cohort's subjects that share the ids.

    Returns:
        (correction or None, where it came from, the validation keys used).
    """
    from rankcore.cache import open_cache

    card = runner.card
    val_keys = tuple(read_split_record(model_dir, card).get("val", ()))
    digest = card.get("data", {}).get("digest")
    candidates = [(str(cache_dir), view, data)]
    train_cache = card.get("data", {}).get("cache_dir")
    if train_cache and Path(train_cache).resolve() != Path(cache_dir).resolve():
        candidates.append((train_cache, None, None))
    if len(val_keys) >= 2 and digest:
        for where, v, subjects in candidates:
            try:
                v = v if v is not None else open_cache(where, config)
                if data_digest(v) != digest:
                    continue
                subjects = subjects if subjects is not None else read_subjects(where, config)
            except InputError:
                continue
            position = {k: i for i, k in enumerate(subjects.participant_ids)}
            if not all(k in position for k in val_keys):
                continue
            val = subjects.subset([position[k] for k in val_keys])
            _, final = runner.ages(where, val, config.to_dict())
            try:
                correction = fit_bias_correction(final, val.ages, fitted_on="val")
            except InputError:
                continue
            return correction, f"fitted on {len(val_keys)} validation subjects of {where}", \
                val_keys
    try:
        correction = load_bias(model_dir, card)
    except InputError:
        return None, "the training data (validation subjects) is not available and no " \
                     "correction is stored in MODEL_DIR", val_keys
    return correction, f"stored in {model_dir / BIAS_FILE}", val_keys


def _write_qc(tmp: Path, view: Any, rows: np.ndarray, ages: np.ndarray, final: np.ndarray,
              pred_table: Any, model_dir: Path, split: str) -> None:
    """qc.html: a montage per evaluated subject and the cache's quarantine table."""
    import pyarrow.parquet as pq

    cols = pred_table.column_names
    bounds = [np.asarray(pred_table.column(c).to_numpy(zero_copy_only=False), np.float64)
              if c in cols else np.full(len(rows), np.nan) for c in ("interval_low",
                                                                     "interval_high")]
    keys = [view.keys[i] for i in rows]
    subjects = [QCSubject(k, float(a), float(p), float(lo), float(hi))
                for k, a, p, lo, hi in zip(keys, ages, final, *bounds)]
    qpath = view.layout.quarantine_path
    quarantine = pq.read_table(qpath).to_pylist() if qpath.exists() else []
    render_qc(subjects, lambda i: view.read_volume(int(rows[i])), quarantine, tmp / QC_FILE,
              title=f"QC of {model_dir.name} on split {split}")


def _setup(model_dir: Path, cache_dir: Path, out_dir: Path, split: str, device: str,
           allow_incomplete_cache: bool, engine: str, workers: int, batch_size: int | None
           ) -> tuple[CascadeRunner, Any, Any, np.ndarray, str | None]:
    """Load and check everything: (runner, config, cache view, rows to evaluate,
    incomplete-cache warning or None). Engine ray checks CUDA on the workers, not here."""
    from rankcore.cache import check_complete

    if not isinstance(split, str) or not split:
        raise InputError(f"`split` must be a split name or 'all', got {split!r}")
    check_engine_workers(engine, workers)
    prepare_out_dir(out_dir)
    runner = load_runner(model_dir, engine=engine, workers=workers, device=device,
                         batch_size=batch_size)
    config = model_preprocess(runner.card)
    view = open_model_cache(cache_dir, config)
    warning = check_complete(cache_dir, config, allow_incomplete=allow_incomplete_cache)
    rows = split_rows(view, runner.card, split, str(cache_dir))
    return runner, config, view, rows, warning


def _locations(model_dir: str | Path, cache_dir: str | Path, out_dir: str | Path
               ) -> tuple[Path, Path, Path]:
    """The three folders as paths (``file://`` URIs accepted, other URIs refused)."""
    return (local_path(model_dir, "model_dir"), local_path(cache_dir, "cache_dir"),
            local_path(out_dir, "out_dir"))


def check_evaluation(model_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *,
                     split: str = "test", device: str = "cpu",
                     allow_incomplete_cache: bool = False, engine: str = "local",
                     workers: int = 1) -> int:
    """Check the inputs of :func:`evaluate_model` without predicting; return the subject count
    (with ``engine="ray"`` CUDA is not required here: the Ray workers check it).

    Raises:
        InputError, CheckpointError: as :func:`evaluate_model`.
    """
    return len(_setup(*_locations(model_dir, cache_dir, out_dir), split, device,
                      allow_incomplete_cache, engine, workers, None)[3])


def evaluate_model(model_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *,
                   split: str = "test", n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, batch_size: int | None = None, device: str = "cpu",
                   store_bias: bool = True, allow_incomplete_cache: bool = False,
                   engine: str = "local", workers: int = 1) -> Evaluation:
    """Predict every subject of ``split`` once, score them and write the report folder.

    Args:
        model_dir: a folder written by :func:`rankcore.train.cascade.train_cascade`.
        cache_dir: a cache holding volumes preprocessed with the model's config.
        out_dir: the report folder (created; an earlier report there is replaced).
            The three folders are paths or ``file://`` URIs on a POSIX file system
            (:mod:`rankcore.locations`); engine ray needs the cache at a path every node sees.
        split: the cache's ``split`` label to evaluate, or ``"all"`` for every row.
        n_boot, seed, level: bootstrap resamples, seed and interval coverage.
        batch_size: subjects per forward pass (None: the card's ``eval_batch_size``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (engine ray: ``"cuda"`` asks for GPU
            workers, and CUDA is checked on them, not in this process).
        store_bias: also store the fitted correction in MODEL_DIR/bias.json (for
            ``predict --bias-correct``); a read-only MODEL_DIR only logs a warning.
        allow_incomplete_cache: evaluate a cache left by an interrupted ingest (refused
            otherwise), with a warning.
        engine: where the forward passes run: ``"local"`` (this process) or ``"ray"`` (Ray
            tasks that read their own rows from the cache; this process reads no volume for
            them); :mod:`rankcore.inference.engine`. Both give the same ages.
        workers: Ray tasks at a time (engine ray; 1 with engine local).

    Returns:
        An :class:`Evaluation`.

    Raises:
        InputError: a cache without the model's preprocessing (mismatch), an unknown or empty
            split, an ``out_dir`` holding something else, an incomplete cache
            (:class:`~rankcore.errors.IncompleteCacheError`).
        CheckpointError: an unreadable model folder.
    """
    model_dir, cache_dir, out_dir = _locations(model_dir, cache_dir, out_dir)
    runner, config, view, rows, incomplete = _setup(
        model_dir, cache_dir, out_dir, split, device, allow_incomplete_cache, engine, workers,
        batch_size)
    card = runner.card
    table = view.table
    data = read_subjects(cache_dir, config)
    if tuple(data.participant_ids) != tuple(view.keys):
        raise InputError(f"cache {str(cache_dir)!r} changed while it was read: run again")
    subjects = data.subset(rows)
    log.info("evaluating %s on %d subject(s) of split %r of %s (engine %s)", model_dir,
             len(rows), split, view.layout.folder, engine)
    with ray_running(engine, workers):
        stage1, final = runner.ages(cache_dir, subjects, config.to_dict())
        if len(final) != len(rows):  # every subject exactly once: no padding, no loss
            raise InputError(f"predicted {len(final)} subjects for {len(rows)} rows")
        correction, bias_source, val_keys = _validation_correction(
            runner, model_dir, cache_dir, view, data, config)

    warnings: list[str] = [incomplete] if incomplete else []
    keys = [view.keys[i] for i in rows]
    same_data = data_digest(view) == card.get("data", {}).get("digest")
    trained_on = set(read_split_record(model_dir, card).get("train", ())) | set(val_keys)
    overlap = sum(k in trained_on for k in keys) if same_data else 0
    if overlap:
        warnings.append(f"{overlap} of the {len(keys)} evaluated subjects were used in "
                        "training or validation (in-sample)")
    if correction is None:
        warnings.append(f"no bias correction: {bias_source}")
    elif same_data and set(keys) & set(val_keys):
        warnings.append("the bias correction was fitted on evaluated subjects (the validation "
                        "split): its corrected metrics are in-sample")

    ages = subjects.ages
    sites = [None if s == "n/a" else s for s in subjects.sites]
    metrics = build_metrics(final, stage1, ages, sites, correction=correction, n_boot=n_boot,
                            seed=seed, level=level)
    metrics["bias_corrected"]["source"] = bias_source
    interval = load_interval(card)
    metrics["interval"] = None if interval is None else {
        "level": interval.level, "n_calibration": interval.n_calibration,
        "exact": interval.exact, **interval_coverage(*interval.bounds(final), ages)}
    sources = table.column("source_path").to_pylist()
    pids = table.column("participant_id").to_pylist()
    metrics["floor"] = simulated_floor([sources[i] for i in rows], [pids[i] for i in rows])
    metrics.update({
        "split": split, "model_dir": str(model_dir.resolve()),
        "cache_dir": str(Path(cache_dir).resolve()),
        "training_key": card.get("training_key"), "preprocess": config.to_dict(),
        "same_data_as_training": same_data, "overlap_with_training": overlap,
        "warnings": warnings,
    })
    metrics = json_safe(metrics)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)  # of a killed earlier run (the CLI holds the folder's lock)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        sessions = table.column("session").to_pylist()
        pred_table = predictions_table(
            [pids[i] for i in rows], [sessions[i] for i in rows], sites, ages, stage1, final,
            correction=correction, cole=True, interval=interval)
        write_table(pred_table, tmp / "predictions.csv")
        if correction is not None:
            save_bias(tmp / BIAS_FILE, correction, card, source=bias_source,
                      val_keys=list(val_keys))
        gap = final - ages
        corrected_gap = None
        if correction is not None:
            corrected_gap = np.asarray(pred_table.column("corrected_gap").to_numpy(
                zero_copy_only=False), dtype=np.float64)
        figures = [Figure("pred_vs_age.png", "Predicted vs chronological age (identity line "
                                             "in black)"),
                   Figure("gap_vs_age.png", "Brain-age gap vs age, before and after "
                                            "bias correction"),
                   Figure("site_gap.png", "Brain-age gap per site")]
        plot_pred_vs_age(ages, final, tmp / figures[0].file, stage1=stage1)
        plot_gap_vs_age(ages, gap, tmp / figures[1].file, corrected_gap=corrected_gap)
        plot_site_boxes(sites, gap, tmp / figures[2].file)
        _write_qc(tmp, view, rows, ages, final, pred_table, model_dir, split)
        if copy_curves(model_dir, card, tmp):
            figures.append(Figure(CURVES_FILE, "Training curves (copied from the model "
                                               "folder)"))
        facts = [f"model: {model_dir.resolve()} (training key "
                 f"{str(card.get('training_key'))[:12]})",
                 f"cache: {Path(cache_dir).resolve()} ({describe_config(config)})",
                 f"split: {split} ({len(rows)} subjects, {metrics['n']} with an age)",
                 f"bias correction: {bias_source}",
                 f"QC page: {QC_FILE} next to this report (mid-slice montages, largest gaps "
                 "first; subjects set aside at ingest)", *warnings]
        title = f"Brain-age evaluation of {model_dir.name} on split {split}"
        blocks = report_blocks(metrics, figures, title=title, facts=facts)
        (tmp / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(blocks, tmp), encoding="utf-8")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n",
                                        encoding="utf-8")
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if correction is not None and store_bias:
        try:
            # No validation ids in the model folder: it is meant to be shared.
            save_bias(model_dir / BIAS_FILE, correction, card, source=bias_source,
                      n_val=len(val_keys))
        except OSError as err:
            log.warning("could not store the bias correction in %s: %s", model_dir, err)
    files = {p.name: str(p) for p in sorted(out_dir.iterdir()) if p.is_file()}
    summary = render_markdown([b for b in blocks if b.kind != "figure"])
    return Evaluation(out_dir, metrics, files, summary, tuple(warnings))
