"""The jobs of a cascade run: each a function of the plan alone, run anywhere.

``run_job(plan, job)`` trains one fold model (``fold-i``: stage 1 on the other folds, then
predicts fold i), the final stage 1 (``stage1``: all training subjects; predicts validation and,
for the record, its own training subjects) or stage 2 (``stage2``: on the out-of-fold stage-1
estimates; validated on the final stage 1's). It reads the cache and what earlier jobs left in
the plan's staging folder, so it can run in this process, in a process pool or as a Prefect
task; run again, it resumes from its latest epoch checkpoint (a finished job only recomputes
its predictions). Files of a job, in ``staging/<stage dir>/``: the stage's model and card
(rankcore.train.checkpoint) and ``heldout.csv`` (folds) or ``predictions.csv``.

Where the volumes are read: with engine ``local`` the training and validation subjects are
loaded once into this process (memoised per plan); with engine ``ray`` this process reads
only the cache's metadata: the subjects travel as :class:`~rankcore.train.cache_split.CacheSplit`
(cache root + keys) to the Ray Train workers, and the predictions of a job run as Ray tasks
(:func:`rankcore.train.ray_predict.predict_ray`), each reading its own rows.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankcore.errors import InputError, TrainingError
from rankcore.train.cache_split import CacheSplit
from rankcore.train.cascade_plan import CARD_FILE, CascadePlan
from rankcore.train.checkpoint import load_stage_model
from rankcore.train.data import SubjectData, dataset_features
from rankcore.train.data_sources import read_channels
from rankcore.train.loop import StageResult, train_stage
from rankcore.train.predict import predict
from rankcore.train.split import DIGEST_COLUMNS, cache_data_digest
from rankcore.train.storage import join_storage

__all__ = ["HELDOUT_FILE", "PREDICTIONS_FILE", "Progress", "clear_data_cache", "epoch_line",
           "fmt_years", "progress_event", "read_predictions", "run_job", "stage_dir",
           "stage_summary", "write_csv"]

log = logging.getLogger("rankcore.train.cascade")

#: ``progress(event)`` after every epoch of every job. ``event`` holds ``job``, ``stage``,
#: ``epoch`` (1-based), ``epochs`` (planned), ``fraction`` (of all planned epochs, in [0, 1]),
#: ``done`` (the job finished) and ``metrics`` (the loop's per-epoch metrics dict).
Progress = Callable[[dict[str, Any]], None]

PREDICTIONS_FILE = "predictions.csv"
HELDOUT_FILE = "heldout.csv"


# ---- data --------------------------------------------------------------------------------

_DATA: dict[tuple[str, str], SubjectData] = {}


def _load_subjects(plan: CascadePlan) -> SubjectData:
    """Training + validation subjects of the plan, volumes preloaded (memoised per process).

    The volumes keep the cache's storage dtype (float16 by default: 300 subjects at
    (80, 96, 80) take 370 MB). Only the last plan's data is kept.
    """
    memo_key = (plan.cache_dir, plan.data_digest)
    data = _DATA.get(memo_key)
    if data is not None:
        return data
    _DATA.clear()
    ds = _check_cache(plan)
    wanted = [*plan.split["train"], *plan.split["val"]]
    position = {k: i for i, k in enumerate(ds.keys)}
    rows = [position[k] for k in wanted]
    first = read_channels(ds, rows[0])
    dtype = torch.float16 if first.dtype == np.float16 else torch.float32
    images = torch.empty((len(rows), *first.shape), dtype=dtype)
    for j, i in enumerate(rows):
        images[j] = torch.from_numpy(np.array(read_channels(ds, i)))
    features, names = dataset_features(ds)
    data = SubjectData.from_tensors(images, [ds.ages[i] for i in rows],
                                    sex=[ds.sexes[i] for i in rows], participant_ids=wanted,
                                    sites=[ds.sites[i] for i in rows],
                                    features=None if features is None else features[rows],
                                    feature_names=names or None,
                                    channel_names=getattr(ds, "channel_names", None))
    _DATA[memo_key] = data
    return data


def _check_cache(plan: CascadePlan) -> Any:
    """The plan's VolumeDataset (metadata only), after checking the cache has not changed."""
    from rankcore.cache import VolumeDataset
    from rankcore.mri.types import PreprocessConfig

    ds = VolumeDataset(plan.cache_dir, PreprocessConfig(**plan.preprocess))
    table = ds.view.table
    columns = {c: table.column(c).to_pylist() for c in DIGEST_COLUMNS}
    if cache_data_digest(plan.preproc_digest, columns) != plan.data_digest:
        raise InputError(f"cache {plan.cache_dir!r} changed since this run was planned: run "
                         "the training again")
    return ds


def clear_data_cache() -> None:
    """Drop the memoised volumes (:func:`run_job` keeps the last plan's in memory)."""
    _DATA.clear()


class _Subjects:
    """The plan's subjects by key: views of the preloaded data (engine local), or
    CacheSplits that Ray workers and tasks read themselves (engine ray)."""

    def __init__(self, plan: CascadePlan):
        self.plan = plan
        if plan.engine == "ray":
            _check_cache(plan)
            self._data = None
        else:
            self._data = _load_subjects(plan)
            self._where = {k: i for i, k in enumerate(self._data.participant_ids)}

    def get(self, keys: Any, stage1: Any = None) -> SubjectData | CacheSplit:
        keys = tuple(keys)
        if self._data is None:
            s1 = None if stage1 is None else dict(zip(keys, (float(v) for v in stage1)))
            return CacheSplit(self.plan.cache_dir, stage1=s1, preload=False, keys=keys,
                              preprocess=self.plan.preprocess)
        data = self._data.subset([self._where[k] for k in keys])
        return data if stage1 is None else data.with_stage1(stage1)

    def predict(self, res: StageResult, keys: Any, stage1: Any = None,
                **kw: Any) -> np.ndarray:
        """Ages of the subjects ``keys`` from the finished stage ``res``."""
        data = self.get(keys, stage1)
        if isinstance(data, CacheSplit):
            from rankcore.train.ray_predict import predict_ray

            return predict_ray([res.out_dir], data, workers=self.plan.workers,
                               use_gpu=self.plan.use_gpu, batch_size=kw["batch_size"])[0]
        return predict(res.model, data, **kw)


# ---- small files ---------------------------------------------------------------------------

def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_predictions(path: Path, column: str) -> dict[str, float]:
    if not path.is_file():
        raise TrainingError(f"{str(path)!r} is missing: run the job that writes it first")
    with open(path, newline="") as fh:
        return {row["key"]: float(row[column]) for row in csv.DictReader(fh)}


def fmt_years(x: float) -> str:
    return f"{x:.6f}"


# ---- jobs --------------------------------------------------------------------------------

def epoch_line(job: str, m: dict[str, Any], epochs: int) -> str:
    if m["epoch"] < 0:  # the starting point, scored before training (rankcore.train.loop)
        return (f"{job} epoch 0/{epochs} (start: prior alone / no correction): val MAE "
                f"{m['val_mae']:.2f} SRCC {m['val_srcc']:.3f}")
    line = (f"{job} epoch {m['epoch'] + 1}/{epochs}: loss {m['train_total']:.3f} (regression "
            f"{m['train_regression']:.3f}, rank {m['train_rank']:.4f}, diff "
            f"{m['train_diff']:.3f}) train MAE {m['train_mae']:.2f}")
    if "val_mae" in m:
        line += f" | val MAE {m['val_mae']:.2f} SRCC {m['val_srcc']:.3f}"
    return line


def progress_event(plan: CascadePlan, job: str, metrics: dict[str, Any], done: bool = False
           ) -> dict[str, Any]:
    epochs = plan.epochs(job)
    epoch = epochs if done else int(metrics["epoch"]) + 1
    return {"job": job, "stage": 2 if job == "stage2" else 1, "epoch": epoch,
            "epochs": epochs, "done": done, "metrics": dict(metrics),
            "fraction": (plan.epoch_offset(job) + epoch) / plan.total_epochs}


def _ray_storage(plan: CascadePlan) -> tuple[str, bool]:
    """Ray Train storage of the plan's jobs, and whether it is ours to delete when done.

    Without ``storage_path``: ``ray/`` in the staging folder (beside MODEL_DIR, so on a
    cluster on the storage every node must see anyway); it is deleted when a job finishes
    and kept after a failure, so the same training resumes from it.
    """
    if plan.storage_path is None:
        return str(Path(plan.staging_dir) / "ray"), True
    return join_storage(plan.storage_path, f"cascade-{plan.training_key[:12]}"), False


def _train(plan: CascadePlan, job: str, train: Any, val: Any,
           out_dir: Path, progress: Progress | None) -> StageResult:
    stage = 2 if job == "stage2" else 1
    config = plan.train_config(job)

    def report(metrics: dict[str, Any], _path: Path | None) -> None:
        if progress is not None:
            progress(progress_event(plan, job, metrics))

    try:
        if plan.engine == "local":
            return train_stage(stage, config, train, val, out_dir=out_dir, report=report,
                               resume=True)
        if (out_dir / CARD_FILE).is_file():  # finished in an earlier attempt
            model, card = load_stage_model(out_dir)
            return StageResult(model, card["history"], card["best_epoch"], out_dir, card)
        from rankcore.train.ray_train import train_stage_ray

        storage, ours = _ray_storage(plan)
        res = train_stage_ray(stage, config, train, val, out_dir=out_dir,
                              num_workers=plan.workers, use_gpu=plan.use_gpu,
                              storage_path=storage, name=job, max_failures=1)
        if ours:
            shutil.rmtree(Path(storage) / job, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path(storage).rmdir()
        for m in res.history:  # the workers' log lines stay with Ray: repeat them here
            log.info(epoch_line(job, m, config.epochs))
            report(m, None)
        return res
    except TrainingError as err:
        raise TrainingError(f"{job}: {err} Nothing was written to `model_dir` "
                            f"{plan.model_dir!r}; running the same training again resumes "
                            f"from {plan.staging_dir!r}.") from err


def run_job(plan: CascadePlan, job: str, progress: Progress | None = None) -> dict[str, Any]:
    """Run one job of the plan (see the module docstring) in the staging folder.

    Args:
        plan: from :func:`rankcore.train.cascade_plan.plan_cascade`.
        job: one of ``plan.jobs``.
        progress: called after every epoch (see :data:`Progress`).

    Returns:
        ``{"job", "epochs_run", "best_epoch", "seconds", "val_mae"}`` (val_mae None without
        validation).

    Raises:
        InputError: unknown job, or the cache changed since planning.
        TrainingError: the loss became NaN (the last good checkpoint stays in the staging
            folder), or ``stage2`` before the jobs it needs.
    """
    if job not in plan.jobs:
        raise InputError(f"`job` must be one of {', '.join(plan.jobs)}, got {job!r}")
    t0 = time.perf_counter()
    staging = Path(plan.staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    subjects = _Subjects(plan)
    train_keys, val_keys = list(plan.split["train"]), list(plan.split["val"])
    val = subjects.get(val_keys) if val_keys else None
    config = plan.train_config(job)
    kw = {"batch_size": config.eval_batch_size, "flip_tta": config.flip_tta,
          "channels_last": config.channels_last, "amp": config.amp}
    if job.startswith("fold-"):
        fold = int(job.split("-", 1)[1])
        folds = np.asarray(plan.folds)
        held = [train_keys[i] for i in np.flatnonzero(folds == fold)]
        fit = [train_keys[i] for i in np.flatnonzero(folds != fold)]
        log.info("%s: stage 1 on %d subjects, predicts the %d held out", job, len(fit),
                 len(held))
        out = staging / "crossfit" / job
        out.parent.mkdir(exist_ok=True)
        res = _train(plan, job, subjects.get(fit), val, out, progress)
        pred = subjects.predict(res, held, **kw)
        write_csv(out / HELDOUT_FILE, ["key", "fold", "stage1_oof"],
                  [[k, fold, fmt_years(p)] for k, p in zip(held, pred)])
    elif job == "stage1":
        log.info("stage1: stage 1 on all %d training subjects", len(train_keys))
        out = staging / "stage1"
        res = _train(plan, job, subjects.get(train_keys), val, out, progress)
        rows = [[k, "train", fmt_years(p)] for k, p in
                zip(train_keys, subjects.predict(res, train_keys, **kw))]
        if val_keys:
            rows += [[k, "val", fmt_years(p)] for k, p in
                     zip(val_keys, subjects.predict(res, val_keys, **kw))]
        write_csv(out / PREDICTIONS_FILE, ["key", "role", "stage1"], rows)
    else:
        s1 = read_predictions(staging / "stage1" / PREDICTIONS_FILE, "stage1")
        if plan.stage2_source in ("insample", "off"):  # stage 1's own training estimates
            oof = s1
        else:
            oof = {}
            for i in range(plan.k_folds):
                oof.update(read_predictions(staging / "crossfit" / f"fold-{i}" / HELDOUT_FILE,
                                            "stage1_oof"))
        log.info("stage2: %s", "off: stage 2 makes no correction" if plan.stage2_source == "off"
                 else f"stage 2 on {len(train_keys)} training subjects with "
                      f"{'in-sample' if plan.stage2_source == 'insample' else 'out-of-fold'} "
                      "stage-1 estimates")
        val_s1 = [s1[k] for k in val_keys]
        train2 = subjects.get(train_keys, [oof[k] for k in train_keys])
        val2 = subjects.get(val_keys, val_s1) if val_keys else None
        out = staging / "stage2"
        res = _train(plan, job, train2, val2, out, progress)
        rows = []
        if val_keys:
            rows = [[k, fmt_years(b), fmt_years(p)] for k, b, p in
                    zip(val_keys, val_s1, subjects.predict(res, val_keys, val_s1, **kw))]
        write_csv(out / PREDICTIONS_FILE, ["key", "stage1", "cascade"], rows)
    if progress is not None and res.history:
        progress(progress_event(plan, job, res.history[-1], done=True))
    best = [m for m in res.history if m["epoch"] == res.best_epoch]
    val_mae = best[0].get("val_mae") if best else None
    return {"job": job, "epochs_run": len(res.history), "best_epoch": res.best_epoch,
            "seconds": time.perf_counter() - t0, "val_mae": val_mae}


def stage_dir(plan: CascadePlan, job: str) -> Path:
    """The folder of ``job``'s stage inside the staging folder."""
    staging = Path(plan.staging_dir)
    return staging / "crossfit" / job if job.startswith("fold-") else staging / job


def stage_summary(folder: Path) -> dict[str, Any]:
    """History, best epoch, sizes, seconds and objective of the finished stage in ``folder``.

    Raises:
        TrainingError: the stage has not finished.
    """
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise TrainingError(f"{str(folder)!r} holds no finished stage: run its job first") \
            from None
    history = card["history"]
    return {"history": history, "best_epoch": card["best_epoch"],
            "epochs_run": sum(1 for m in history if m["epoch"] >= 0),
            "n_train": card["n_train"], "n_val": card["n_val"],
            "seconds": float(sum(m.get("seconds", 0.0) for m in history)),
            "resumes": card.get("resumes", []), "objective": card.get("objective")}
