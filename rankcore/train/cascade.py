"""Train the whole cascade from a Parquet cache into one model folder.

Steps (DESIGN.md's data flow; FIELD.md's defects of the reference avoided)::

    plan_cascade      split (the cache's split column, or seeded and stratified by site and age),
                      folds, checks; nothing written            (rankcore.train.cascade_plan)
    fold-0 … fold-K−1 stage 1 on K − 1 folds, predicts the held-out fold (out-of-fold estimates)
    stage1            stage 1 on all training subjects, predicts validation (and, for the
                      record, its own training subjects in-sample)
    stage2            stage 2 on (image, out-of-fold stage-1 estimate); validated on
                      (image, final stage-1 estimate)
    finish_cascade    card.json + training_curves.png, then the staging folder becomes MODEL_DIR

Every job is a function of the plan alone (:func:`rankcore.train.cascade_jobs.run_job`): it
reads the cache and what earlier jobs left in the staging folder, so a job can run in this
process, in a process pool or as a Prefect task, and the job is the retry unit. A job that is
run again resumes from its latest epoch checkpoint (a finished job only recomputes its
predictions). ``fold-*`` and ``stage1`` are independent; ``stage2`` needs all of them.

MODEL_DIR layout (no participant id anywhere in it: it is meant to be shared)::

    card.json               config, data digest, how the split was made (counts and seeds),
                            metrics per epoch of every job, summary metrics, library versions,
                            rank convention, the cache's preprocessing config, intended use,
                            training population (age range, sex and site mix)
    training_curves.png     training loss and validation MAE per epoch of every job
    stage1/, stage2/        model.safetensors + card.json
    crossfit/fold-i/        model.safetensors + card.json of each fold model

MODEL_DIR.records/ (per-subject training records; keep them with the data,
:mod:`rankcore.train.card_info`)::

    split.json              training key, training and validation keys, folds
    stage1/predictions.csv  key, role, stage1;   stage2/predictions.csv: key, stage1, cascade
    crossfit/fold-i/heldout.csv, crossfit/oof.csv   key, fold, stage1_oof
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankcore._sealed import read_sealed, seal
from rankcore.errors import CheckpointError, CorruptFileError, TrainingError
from rankcore.locations import local_path
from rankcore.models.cascade import Cascade
from rankcore.train.card_info import (
    INTENDED_USE,
    cache_population,
    card_interval,
    move_records,
    records_dir,
)
from rankcore.train.cascade_jobs import (
    HELDOUT_FILE,
    PREDICTIONS_FILE,
    Progress,
    clear_data_cache,
    epoch_line,
    fmt_years,
    progress_event,
    read_predictions,
    run_job,
    stage_dir,
    stage_summary,
    write_csv,
)
from rankcore.train.cascade_plan import (
    CARD_FILE,
    CARD_FORMAT,
    DEFAULT_K_FOLDS,
    DEFAULT_VAL_FRACTION,
    CascadePlan,
    check_model_dir,
    plan_cascade,
)
from rankcore.train.checkpoint import (
    MODEL_FILE,
    bind_preprocess,
    file_sha256,
    library_versions,
    load_stage_model,
    weights_preprocess,
)
from rankcore.train.objective import rank_convention
from rankcore.train.predict import evaluate

__all__ = ["CascadeResult", "Progress", "finish_cascade", "load_cascade", "read_card",
           "run_job", "train_cascade"]

log = logging.getLogger("rankcore.train.cascade")


CURVES_FILE = "training_curves.png"
OOF_FILE = "oof.csv"
#: The files a loaded cascade reads; the card records the sha256 of each.
BOUND_FILES = ("stage1/model.safetensors", "stage1/card.json", "stage2/model.safetensors",
               "stage2/card.json")


@dataclass(frozen=True)
class CascadeResult:
    """A trained cascade folder.

    Attributes:
        model_dir: the folder.
        card: its card.json.
        reused: True when the folder already held this run and nothing was trained.
    """

    model_dir: Path
    card: dict[str, Any]
    reused: bool

    def load(self, map_location: str | torch.device = "cpu") -> Cascade:
        """The cascade model (stage 1 + stage 2), in eval mode."""
        return load_cascade(self.model_dir, map_location)[0]



# ---- finishing -----------------------------------------------------------------------------

def _prune(folder: Path) -> None:
    """Drop the per-epoch checkpoints (optimizer states) of a finished stage folder."""
    # ".epoch-*" are temporary epoch folders left by a process killed while writing one.
    for p in (*folder.glob("epoch-*"), *folder.glob(".epoch-*")):
        shutil.rmtree(p, ignore_errors=True)
    (folder / "latest.json").unlink(missing_ok=True)


def _metrics(pred: np.ndarray, ages: np.ndarray) -> dict[str, float] | None:
    return evaluate(pred, ages) if len(pred) else None


def _build_card(plan: CascadePlan, staging: Path) -> dict[str, Any]:
    stages = {job: stage_summary(stage_dir(plan, job)) for job in plan.jobs}
    train_keys, val_keys = plan.split["train"], plan.split["val"]
    train_ages, val_ages = np.asarray(plan.train_ages), np.asarray(plan.val_ages)
    oof_metrics = None
    if plan.stage2_source == "oof":
        oof: dict[str, float] = {}
        for i in range(plan.k_folds):
            oof.update(read_predictions(staging / "crossfit" / f"fold-{i}" / HELDOUT_FILE,
                                        "stage1_oof"))
        oof_arr = np.array([oof[k] for k in train_keys])
        write_csv(staging / "crossfit" / OOF_FILE, ["key", "fold", "stage1_oof"],
                  [[k, f, fmt_years(p)] for k, f, p in zip(train_keys, plan.folds, oof_arr)])
        oof_metrics = _metrics(oof_arr, train_ages)
    s1 = read_predictions(staging / "stage1" / PREDICTIONS_FILE, "stage1")
    final = read_predictions(staging / "stage2" / PREDICTIONS_FILE, "cascade")
    s1_train = np.array([s1[k] for k in train_keys])
    s1_val = np.array([s1[k] for k in val_keys])
    cascade_val = np.array([final[k] for k in val_keys])
    config = plan.train_config("stage1")
    return {
        "format": CARD_FORMAT,
        "training_key": plan.training_key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": plan.config,
        "stage2_config": plan.stage2_config,
        "k_folds": plan.k_folds, "stage2_source": plan.stage2_source,
        "engine": plan.engine, "workers": plan.workers, "use_gpu": plan.use_gpu,
        "data": {"digest": plan.data_digest, "cache_dir": plan.cache_dir,
                 "preproc_digest": plan.preproc_digest,
                 "n_train": len(train_keys), "n_val": len(val_keys)},
        "preprocess": dict(plan.preprocess, digest=plan.preproc_digest),
        "split": {k: v for k, v in plan.split.items() if k not in ("train", "val")},
        "intended_use": INTENDED_USE,
        "training_population": cache_population(plan.cache_dir, plan.preprocess,
                                                [*train_keys, *val_keys]),
        "records": records_dir(plan.model_dir).name,
        "stages": stages,
        "metrics": {
            "train_stage1_oof": oof_metrics,
            "train_stage1_in_sample": _metrics(s1_train, train_ages),
            "val_stage1": _metrics(s1_val, val_ages),
            "val_cascade": _metrics(cascade_val, val_ages),
        },
        "interval": card_interval(cascade_val, val_ages, s1_train, train_ages),
        "versions": library_versions(),
        "rank_convention": rank_convention(config),
        "files": {"stage1": "stage1/model.safetensors", "stage2": "stage2/model.safetensors",
                  "curves": CURVES_FILE},
        "seconds": float(sum(s["seconds"] for s in stages.values())),
    }


def finish_cascade(plan: CascadePlan) -> CascadeResult:
    """Write the card and the curves into the staging folder, then rename it onto MODEL_DIR.

    Raises:
        TrainingError: a job has not finished.
        InputError: MODEL_DIR was filled by another run meanwhile.
    """
    from rankcore.train.curves import plot_training_curves

    staging, model_dir = Path(plan.staging_dir), Path(plan.model_dir)
    config = plan.train_config("stage1")
    if not staging.is_dir():
        if check_model_dir(model_dir, plan.training_key, config, plan.k_folds,
                           plan.data_digest):  # finished by an earlier attempt
            return CascadeResult(model_dir, json.loads((model_dir / CARD_FILE).read_text()),
                                 True)
        raise TrainingError(f"staging folder {str(staging)!r} is missing: run the jobs first")
    card = _build_card(plan, staging)
    for job in plan.jobs:
        _prune(stage_dir(plan, job))
    # Ids out of the model folder before the checksums: the stage cards lose their id lists.
    records = Path(f"{plan.staging_dir}{Path(card['records']).suffix}")
    move_records(staging, records, plan.split, plan.folds, plan.training_key)
    plot_training_curves({job: s["history"] for job, s in card["stages"].items()},
                         staging / CURVES_FILE, title=f"cascade {model_dir.name}")
    # Bind the weights to their preprocessing, then let the card's checksum cover the weights.
    for job in ("stage1", "stage2"):
        bind_preprocess(staging / job, plan.preprocess, plan.preproc_digest)
    card["files_sha256"] = {rel: file_sha256(staging / rel) for rel in BOUND_FILES}
    card = seal(card)
    text = json.dumps(card, indent=2, sort_keys=True, allow_nan=True) + "\n"
    (staging / CARD_FILE).write_text(text)
    if check_model_dir(model_dir, plan.training_key, config, plan.k_folds, plan.data_digest):
        shutil.rmtree(staging, ignore_errors=True)  # a concurrent run finished first
        shutil.rmtree(records, ignore_errors=True)
        return CascadeResult(model_dir, json.loads((model_dir / CARD_FILE).read_text()), True)
    if model_dir.exists():
        model_dir.rmdir()  # empty (checked above); rename needs it gone or empty
    os.replace(staging, model_dir)
    shutil.rmtree(records_dir(model_dir), ignore_errors=True)  # an earlier model's records
    os.replace(records, records_dir(model_dir))
    clear_data_cache()
    m = card["metrics"]
    log.info("cascade written to %s (val MAE stage 1 %s, cascade %s)", model_dir,
             _fmt_mae(m["val_stage1"]), _fmt_mae(m["val_cascade"]))
    return CascadeResult(model_dir, card, False)


def _fmt_mae(m: dict[str, float] | None) -> str:
    return "n/a" if m is None else f"{m['mae']:.2f}"


# ---- everything ----------------------------------------------------------------------------

def _pool_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _replay(plan: CascadePlan, job: str, progress: Progress | None) -> None:
    """Report a job run in another process: its epochs, read back from its stage card."""
    history = stage_summary(stage_dir(plan, job))["history"]
    for m in history:
        log.info(epoch_line(job, m, plan.epochs(job)))
        if progress is not None:
            progress(progress_event(plan, job, m))
    if progress is not None and history:
        progress(progress_event(plan, job, history[-1], done=True))


def train_cascade(cache_dir: str | Path, model_dir: str | Path,
                  config: Any = None, *, workers: int = 1, use_gpu: bool = False,
                  engine: str = "local", storage_path: str | Path | None = None,
                  k_folds: int = DEFAULT_K_FOLDS, val_fraction: float = DEFAULT_VAL_FRACTION,
                  preprocess: Any = None, stage2: dict[str, Any] | None = None,
                  progress: Progress | None = None, stage2_source: str | None = None,
                  test_fraction: float = 0.0, split_seed: int = 0) -> CascadeResult:
    """Train the cascade on a cache and write MODEL_DIR (see the module docstring).

    Idempotent: when MODEL_DIR's card has this run's training key (same configs, folds and
    data), it is returned without training ("reusing" is logged). Atomic: the run is built in
    ``MODEL_DIR.tmp-<key>`` and renamed at the end; on failure MODEL_DIR is untouched, and the
    same call resumes from the staging folder's checkpoints.

    Args:
        cache_dir: the cache root.
        model_dir: the model folder to create. Both are paths or ``file://`` URIs on a POSIX
            file system (shared by every node with engine ray); another URI is refused
            (:func:`rankcore.locations.local_path`). Only ``storage_path`` takes an object
            store's URI.
        config: stage-1 TrainConfig (used as it is) or a dict of changes to
            :func:`rankcore.train.cascade_plan.default_config` (15 epochs, one intra-op
            thread; with ``k_folds=3``, 300 cached subjects train in ~6 minutes on 2 shared
            CPU cores). None: the defaults.
        workers: engine ``"local"``: processes running the independent stage-1 jobs (the K
            folds and the final stage 1) side by side, one intra-op thread each unless the
            config says otherwise; engine ``"ray"``: Ray Train workers of every stage
            (distributed data parallel, ranking terms on the global batch).
        use_gpu: train on CUDA (bf16 autocast when ``config.amp``).
        engine: ``"local"`` (:func:`train_stage` in-process) or ``"ray"`` (Ray Train).
        storage_path: Ray Train storage (engine ray); None: a temporary folder per stage.
        k_folds: cross-fitting folds for stage 2's out-of-fold inputs.
        val_fraction: validation share carved out when the cache has no ``val`` rows.
        preprocess: PreprocessConfig selecting the cache folder when there are several.
        stage2: overrides of ``config`` for stage 2.
        progress: called after every epoch of every job (see :data:`Progress`).
        stage2_source: ``"oof"`` (cross-fitting; the default with ``use_gpu``), ``"off"``
            (the default on CPU: no fold jobs, stage 2 written as the identity, so the
            cascade's output is stage 1's) or ``"insample"`` (stage 2 on the final stage 1's
            in-sample estimates, no fold jobs: an ablation only). See
            :func:`rankcore.train.cascade_plan.plan_cascade`.
        test_fraction, split_seed: hold out a test split when the cache labels none (see
            :func:`rankcore.train.cascade_plan.plan_cascade`; ``brainrank train`` holds out
            0.2 by default, as the pipeline does).

    Returns:
        A :class:`CascadeResult`.

    Raises:
        InputError: unusable input (see :func:`plan_cascade`), before anything is written.
        TrainingError: the loss became NaN in some job; the message names the job and the
            last good checkpoint (in the staging folder).
    """
    plan = plan_cascade(cache_dir, model_dir, config, k_folds=k_folds,
                        val_fraction=val_fraction, preprocess=preprocess, engine=engine,
                        workers=workers, use_gpu=use_gpu, storage_path=storage_path,
                        stage2=stage2, stage2_source=stage2_source,
                        test_fraction=test_fraction, split_seed=split_seed)
    if plan.reuse:
        log.info("reusing %s: its card matches this config and data (digest %s)",
                 plan.model_dir, plan.data_digest[:12])
        return CascadeResult(Path(plan.model_dir),
                             json.loads((Path(plan.model_dir) / CARD_FILE).read_text()), True)
    log.info("training a cascade into %s: %d training / %d validation subjects (split: %s), "
             "%d folds, engine %s, %d worker(s); staging in %s", plan.model_dir,
             len(plan.split["train"]), len(plan.split["val"]), plan.split["source"],
             plan.k_folds, plan.engine, plan.workers, plan.staging_dir)
    independent = [j for j in plan.jobs if j != "stage2"]
    ray_started = False
    if plan.engine == "ray":
        from rankcore.cache.engines import ensure_ray

        ray_started = ensure_ray(None, max(plan.workers, 2))
    try:
        if plan.engine == "local" and plan.workers > 1:
            threads = plan.train_config("stage1").num_threads or 1
            with ProcessPoolExecutor(max_workers=min(plan.workers, len(independent)),
                                     mp_context=get_context("spawn"), initializer=_pool_init,
                                     initargs=(threads,)) as pool:
                futures = {pool.submit(run_job, plan, job): job for job in independent}
                for future in as_completed(futures):
                    future.result()
                    _replay(plan, futures[future], progress)
        else:
            for job in independent:
                run_job(plan, job, progress)
        run_job(plan, "stage2", progress)
        return finish_cascade(plan)
    finally:
        if ray_started:
            import ray

            ray.shutdown()


def load_cascade(model_dir: str | Path, map_location: str | torch.device = "cpu"
                 ) -> tuple[Cascade, dict[str, Any]]:
    """Load a MODEL_DIR written by :func:`train_cascade`.

    Returns:
        (the :class:`rankcore.models.Cascade` in eval mode, the card).

    Raises:
        CheckpointError: not a cascade folder, or its stage files are missing or corrupt.
    """
    model_dir = local_path(model_dir, "model_dir")
    card = read_card(model_dir)
    if card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"`model_dir` {str(model_dir)!r} is not a brainrank cascade "
                              f"(card format {card.get('format')!r})")
    _check_files(model_dir, card)
    stage1, _ = load_stage_model(model_dir / "stage1", map_location)
    stage2, _ = load_stage_model(model_dir / "stage2", map_location)
    return Cascade(stage1, stage2).eval(), card


def read_card(model_dir: str | Path) -> dict[str, Any]:
    """The verified card.json of a cascade folder.

    Raises:
        CheckpointError: missing, unreadable, or changed since it was written (checksum).
    """
    path = local_path(model_dir, "model_dir") / CARD_FILE
    try:
        return read_sealed(path, f"model card {str(path)!r}")
    except OSError as err:
        raise CheckpointError(f"`model_dir` {str(model_dir)!r} holds no readable cascade card: "
                              f"{err}") from None
    except CorruptFileError as err:
        raise CheckpointError(str(err)) from None


def _check_files(model_dir: Path, card: dict[str, Any]) -> None:
    """Every bound file matches the card's sha256, and each stage's weights carry the card's
    preprocessing; CheckpointError naming the file otherwise."""
    digests = card.get("files_sha256")
    if not isinstance(digests, dict) or set(digests) != set(BOUND_FILES):
        raise CheckpointError(f"model card in {str(model_dir)!r} records no digests of its "
                              "weights (written by an older brainrank): train it again")
    for rel in BOUND_FILES:
        path = model_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing from the cascade folder")
        if file_sha256(path) != digests[rel]:
            raise CheckpointError(f"{str(path)!r} is corrupt: its sha256 differs from the one "
                                  "in card.json (changed after training)")
    stored = card.get("preprocess")
    wanted = {k: v for k, v in stored.items() if k != "digest"} \
        if isinstance(stored, dict) else None
    for job in ("stage1", "stage2"):
        bound = weights_preprocess(model_dir / job / MODEL_FILE)
        if bound is None:
            raise CheckpointError(f"{str(model_dir / job / MODEL_FILE)!r} carries no "
                                  "preprocessing record: train the model again")
        config, digest = bound
        if config != wanted or digest != (stored or {}).get("digest"):
            raise CheckpointError(
                f"card.json of {str(model_dir)!r} says the model takes volumes preprocessed "
                f"as {wanted} (digest {(stored or {}).get('digest')}), but its weights "
                f"({job}/{MODEL_FILE}) were trained on {config} (digest {digest}): the card "
                "does not belong to these weights")
