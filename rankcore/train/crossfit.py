"""Out-of-fold (cross-fitted) stage-1 predictions, the training input of stage 2.

Stage 2 learns how far to trust stage 1. If it learned that from stage 1's predictions on
stage 1's own training subjects (what the reference code does), it would see errors far smaller
than stage 1 makes on new subjects, and would trust stage 1 too much at test time. So the
training split is cut into k folds stratified by age; for each fold a stage-1 model is trained
on the other k − 1 folds and predicts the held-out one. Every subject's estimate then comes
from a model that never saw it. (The final stage 1, trained on all training subjects, predicts
the validation and test subjects.)

Each fold's model is early-stopped on ``val_data`` (the validation split), never on the fold
it predicts, so the held-out fold stays unseen.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData, as_subject_data, stratified_folds
from rankcore.train.loop import Report, train_stage
from rankcore.train.predict import predict

__all__ = ["CrossFit", "cross_fit_stage1"]

log = logging.getLogger("rankcore.train")

OOF_FILE = "oof.csv"


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold stage-1 predictions.

    Attributes:
        predictions: float64 (N,) stage-1 estimates in years, in the order of the data given.
        folds: int (N,) fold of each subject (its estimate comes from the model trained
            without that fold).
        participant_ids: the N subject keys.
        fold_dirs: folder of each fold's stage-1 model.
    """

    predictions: np.ndarray
    folds: np.ndarray
    participant_ids: tuple[str, ...]
    fold_dirs: tuple[Path, ...]


def cross_fit_stage1(config: TrainConfig | dict[str, Any], train_data: Any,
                     val_data: Any = None, *, k: int = 5, out_dir: str | Path,
                     report: Report | None = None, world: Any = None,
                     resume: bool = False) -> CrossFit:
    """Train k stage-1 models on k − 1 folds each and predict the held-out fold.

    Args:
        config: training config of stage 1 (``config.seed`` also seeds the folds).
        train_data: the training split (any kind :func:`train_stage` accepts).
        val_data: the validation split for early stopping (optional).
        k: number of folds (>= 2), stratified by age.
        out_dir: folder for ``fold-0`` … ``fold-{k-1}`` and ``oof.csv``
            (participant_id, fold, stage1_oof).
        report: passed to every fold's :func:`train_stage` (metrics gain a ``fold`` key).
        world: passed to :func:`train_stage`.
        resume: reuse finished folds and continue unfinished ones.

    Returns:
        A :class:`CrossFit`.

    Raises:
        InputError: missing ages, k out of range, or a fold's training part smaller than one
            batch (checked before anything is written).
    """
    config = TrainConfig.from_dict(config)
    train = as_subject_data(train_data, "train_data")
    train.require_ages("train_data")
    folds = stratified_folds(train.ages, k, config.seed)
    smallest = len(train) - int(np.bincount(folds, minlength=k).max())
    if smallest < config.batch_size:
        raise InputError(f"`k` = {k} leaves folds with {smallest} training subject(s), fewer "
                         f"than batch_size {config.batch_size}: use fewer folds or more subjects")
    out_dir = Path(out_dir)
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"`out_dir` {str(out_dir)!r} is not empty: choose an empty folder "
                         "or pass resume=True")
    out_dir.mkdir(parents=True, exist_ok=True)
    oof = np.full(len(train), np.nan)
    dirs = []
    for i in range(k):
        held = np.flatnonzero(folds == i)
        fold_dir = out_dir / f"fold-{i}"
        dirs.append(fold_dir)
        log.info("cross-fit fold %d/%d: train on %d, predict %d", i + 1, k,
                 len(train) - len(held), len(held))
        fold_report = None
        if report is not None:
            def fold_report(metrics, path, _i=i):
                report(dict(metrics, fold=_i), path)
        result = train_stage(1, config, train.subset(np.flatnonzero(folds != i)), val_data,
                             out_dir=fold_dir, report=fold_report, world=world,
                             resume=resume or fold_dir.exists())
        oof[held] = predict(result.model, train, indices=held,
                            batch_size=config.eval_batch_size, flip_tta=config.flip_tta,
                            channels_last=config.channels_last, amp=config.amp)
    if world is None or world.rank == 0:
        _write_oof(out_dir / OOF_FILE, train, folds, oof)
    return CrossFit(oof, folds, train.participant_ids, tuple(dirs))


def _write_oof(path: Path, data: SubjectData, folds: np.ndarray, oof: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".oof.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write("participant_id,fold,stage1_oof\n")
            for pid, f, p in zip(data.participant_ids, folds, oof):
                fh.write(f"{pid},{int(f)},{p:.6f}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
