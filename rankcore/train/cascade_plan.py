"""Planning a cascade run: validate everything, fix the split and folds, name the run.

:func:`plan_cascade` reads only the cache's metadata (no volume), checks every input that can
be checked before training (cache, ages, batch and fold sizes, sorter, model folder) and
returns a :class:`CascadePlan`: a small, picklable, JSON-able record that each training job
(:mod:`rankcore.train.cascade`) executes, in this process, in a process pool, or in a Prefect
task. Nothing is written here.

The run is named by its *training key*: a sha256 over the training configs (without the
execution-only fields :data:`EXECUTION_KEYS`), the number of folds, the validation fraction,
the learned sorter's bytes (if any) and the cache's data digest. A model folder whose card
holds the same key is reused as it is; the run is built in the sibling folder
``MODEL_DIR.tmp-<key[:12]>`` and renamed onto MODEL_DIR when complete, so a crashed run leaves
MODEL_DIR untouched and the same command resumes from the staging folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.locations import local_path
from rankcore.train.config import TrainConfig
from rankcore.train.data import stratified_folds
from rankcore.train.objective import build_objective, resolve_sorter
from rankcore.train.split import DIGEST_COLUMNS, cache_data_digest, training_split

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_K_FOLDS",
    "DEFAULT_PATIENCE",
    "DEFAULT_VAL_FRACTION",
    "ENGINES",
    "EXECUTION_KEYS",
    "STAGE2_SOURCES",
    "CascadePlan",
    "check_model_dir",
    "default_config",
    "plan_cascade",
]

log = logging.getLogger("rankcore.train.cascade")

CARD_FORMAT = "brainrank-cascade/1"
CARD_FILE = "card.json"
ENGINES = ("local", "ray")
#: Where stage 2's training inputs come from (see :class:`CascadePlan`).
STAGE2_SOURCES = ("oof", "insample", "off")

#: Default number of cross-fitting folds on CPU (see :func:`default_config`).
DEFAULT_K_FOLDS = 3
#: Default epochs of every stage-1 and stage-2 job on CPU (see :func:`default_config`).
DEFAULT_EPOCHS = 20
#: Default mini-batch size on CPU (see :func:`default_config`).
DEFAULT_BATCH_SIZE = 8
#: Default early-stopping patience on CPU: below DEFAULT_EPOCHS, so that it can act.
DEFAULT_PATIENCE = 10
#: Fraction of the training pool set aside for validation when the cache names no val rows.
DEFAULT_VAL_FRACTION = 0.1

#: TrainConfig fields that change how a run executes, not what it learns (not in the key).
EXECUTION_KEYS = ("device", "num_threads", "eval_batch_size")


def default_config(**changes: Any) -> TrainConfig:
    """The CPU default of a cascade run: :class:`TrainConfig` with ``epochs=DEFAULT_EPOCHS`` (20),
    ``batch_size=DEFAULT_BATCH_SIZE`` (8), ``early_stopping=DEFAULT_PATIENCE`` (10) and
    ``num_threads=1``; ``changes`` override any field.

    With stage 2 and cross-fitting off on CPU (:func:`plan_cascade`), the budget that five jobs
    of 15 epochs took goes to one stage-1 job: 20 epochs at batch 8 give ~680 optimiser steps
    on 270 training subjects instead of ~250.

    One intra-op thread: on a shared 2-core machine two threads per process spin against
    each other. With cross-fitting on (``stage2_source="oof"``) a cascade with K folds trains
    K + 1 stage-1 models ((K − 1)/K of the training subjects each for the folds, all of them
    for the final one) and one stage 2: about (K + 1) · E epochs over N subjects; K = 3 is the
    fewest folds whose fold models see two thirds of the data. README.md ("Performance")
    gives the measured times.
    """
    base: dict[str, Any] = {"epochs": DEFAULT_EPOCHS, "batch_size": DEFAULT_BATCH_SIZE,
                            "early_stopping": DEFAULT_PATIENCE, "num_threads": 1}
    base.update(changes)
    return TrainConfig.from_dict(base)


@dataclass(frozen=True)
class CascadePlan:
    """Everything the jobs of one cascade run need (plain values only: picklable, JSON-able).

    Attributes:
        cache_dir: the cache root.
        preprocess: the cache's PreprocessConfig as a dict (recorded in the card, so that
            prediction can refuse volumes preprocessed another way).
        preproc_digest: its digest (the cache folder's name).
        model_dir: the final model folder.
        staging_dir: where the run is built (renamed onto ``model_dir`` at the end).
        config: stage-1 TrainConfig dict (the folds and the final stage 1).
        stage2_config: stage-2 TrainConfig dict.
        k_folds: cross-fitting folds.
        engine: ``"local"`` (train_stage in-process) or ``"ray"`` (train_stage_ray).
        workers: local: parallel stage-1 jobs (processes); ray: Ray Train workers per stage.
        use_gpu: ray: GPU workers; local: recorded only (the configs' device decides).
        storage_path: Ray Train storage root, or None (a temporary folder per job).
        data_digest: :func:`rankcore.train.split.cache_data_digest` of the cache.
        training_key: names the run (see the module docstring).
        split: :meth:`TrainingSplit.to_dict` of the training / validation subjects.
        train_ages, val_ages: ages (years) in the order of ``split["train"]`` / ``["val"]``.
        folds: fold of every training subject, in the order of ``split["train"]``.
        reuse: ``model_dir`` already holds this run: nothing to train.
        stage2_source: ``"oof"``: stage 2 trains on out-of-fold stage-1 estimates
            (cross-fitting; the default with ``use_gpu``); ``"insample"``: on the final stage
            1's in-sample estimates of its own training subjects (no fold jobs; the ablation
            the cross-fitting answers); ``"off"`` (the default on CPU): no fold jobs and no
            stage-2 training: stage 2 is written as the identity (no correction, its config's
            ``model`` is ``"prior"``), so the cascade's output is stage 1's.
    """

    cache_dir: str
    preprocess: dict[str, Any]
    preproc_digest: str
    model_dir: str
    staging_dir: str
    config: dict[str, Any]
    stage2_config: dict[str, Any]
    k_folds: int
    engine: str
    workers: int
    use_gpu: bool
    storage_path: str | None
    data_digest: str
    training_key: str
    split: dict[str, Any]
    train_ages: tuple[float, ...]
    val_ages: tuple[float, ...]
    folds: tuple[int, ...]
    reuse: bool = False
    stage2_source: str = "oof"

    @property
    def jobs(self) -> tuple[str, ...]:
        """The jobs in order: ``fold-0`` … ``fold-{k-1}``, ``stage1``, ``stage2``.

        Every job but ``stage2`` is independent of the others; ``stage2`` needs them all.
        With ``stage2_source`` ``"insample"`` or ``"off"`` there are no fold jobs.
        """
        if self.stage2_source in ("insample", "off"):
            return ("stage1", "stage2")
        return (*(f"fold-{i}" for i in range(self.k_folds)), "stage1", "stage2")

    def train_config(self, job: str) -> TrainConfig:
        """The TrainConfig of ``job``."""
        return TrainConfig.from_dict(self.stage2_config if job == "stage2" else self.config)

    def epochs(self, job: str) -> int:
        """Planned (maximum) epochs of ``job``."""
        return int((self.stage2_config if job == "stage2" else self.config)["epochs"])

    def epoch_offset(self, job: str) -> int:
        """Planned epochs of the jobs before ``job`` (for overall progress)."""
        jobs = self.jobs
        return sum(self.epochs(j) for j in jobs[:jobs.index(job)])

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs(j) for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadePlan:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for name in ("train_ages", "val_ages", "folds"):
            d[name] = tuple(d[name])
        return cls(**d)


def _positive_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def training_key(config: TrainConfig, stage2: TrainConfig, k_folds: int, val_fraction: float,
                 data_digest: str, stage2_source: str = "oof",
                 test: dict[str, Any] | None = None) -> str:
    """sha256 naming a run: configs (minus :data:`EXECUTION_KEYS`), folds, data, sorter bytes."""

    def learnable(c: TrainConfig) -> dict[str, Any]:
        return {k: v for k, v in c.to_dict().items() if k not in EXECUTION_KEYS}

    sorters = {}
    for c in (config, stage2):
        if c.rank_loss == "sorter":
            sorters[c.sorter] = _sha256_file(resolve_sorter(c.sorter))
    blob = json.dumps({"format": CARD_FORMAT, "stage1": learnable(config),
                       "stage2": learnable(stage2), "k_folds": k_folds,
                       "val_fraction": float(val_fraction), "data": data_digest,
                       "sorters": sorters,
                       # only when not the default, so that earlier keys stay valid
                       **({"stage2_source": stage2_source} if stage2_source != "oof" else {}),
                       **({"test": test} if test and test.get("source") == "held_out" else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resolve_devices(config: TrainConfig, engine: str, use_gpu: bool) -> str:
    if use_gpu:
        if engine == "ray":
            # GPU workers live on the cluster; the planning (head) node may have no GPU at all.
            return "cuda"
        import torch

        if not torch.cuda.is_available():
            raise InputError("`use_gpu` needs CUDA, and this machine has none: drop --gpu")
        return "cuda"
    if engine == "ray" or config.device == "auto":
        return "cpu"
    return config.device


def check_model_dir(model_dir: Path, key: str, config: TrainConfig, k_folds: int,
                     data_digest: str) -> bool:
    """True when ``model_dir`` holds this very run; InputError when it holds something else."""
    if not model_dir.exists():
        return False
    if not model_dir.is_dir():
        raise InputError(f"`model_dir` must be a folder, got the file {str(model_dir)!r}")
    card_path = model_dir / CARD_FILE
    if not card_path.is_file():
        if any(model_dir.iterdir()):
            raise InputError(f"`model_dir` {str(model_dir)!r} is not empty and holds no cascade "
                             "card: choose another folder")
        return False
    from rankcore._sealed import read_sealed

    try:
        card = read_sealed(card_path, f"model card {str(card_path)!r}")
    except (OSError, InputError) as err:
        raise InputError(f"`model_dir` {str(model_dir)!r} has an unreadable card ({err}): "
                         "choose another folder or delete it") from None
    if card.get("format") != CARD_FORMAT:
        raise InputError(f"`model_dir` {str(model_dir)!r} holds something else than a brainrank "
                         f"cascade (card format {card.get('format')!r})")
    if card.get("training_key") == key:
        return True
    why = []
    if card.get("data", {}).get("digest") != data_digest:
        why.append("other data (the cache's data digest differs)")
    old = card.get("config", {})
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in EXECUTION_KEYS and old.get(k) != v)
    if changed:
        why.append(f"another config ({', '.join(changed)})")
    if card.get("k_folds") != k_folds:
        why.append(f"k_folds {card.get('k_folds')} instead of {k_folds}")
    raise InputError(f"`model_dir` {str(model_dir)!r} holds a cascade trained on "
                     f"{'; '.join(why) or 'other settings'}: choose another --out or delete it")


def plan_cascade(cache_dir: str | Path, model_dir: str | Path,
                 config: TrainConfig | dict[str, Any] | None = None, *,
                 k_folds: int = DEFAULT_K_FOLDS, val_fraction: float = DEFAULT_VAL_FRACTION,
                 preprocess: Any = None, engine: str = "local", workers: int = 1,
                 use_gpu: bool = False, storage_path: str | Path | None = None,
                 stage2: dict[str, Any] | None = None, stage2_source: str | None = None,
                 test_fraction: float = 0.0, split_seed: int = 0) -> CascadePlan:
    """Check the inputs of a cascade run and plan it (reads metadata only; writes nothing).

    Args:
        cache_dir: the cache root (as given to ingest).
        model_dir: the model folder to create.
        config: stage-1 training config: a TrainConfig as it is, or a dict of changes to
            :func:`default_config` (None: the defaults); ``config.seed`` also seeds the
            validation carving and the folds.
        k_folds: cross-fitting folds (>= 2).
        val_fraction: validation share carved from the training pool when the cache has no
            ``val`` rows (0: no validation, no early stopping).
        preprocess: a ``PreprocessConfig`` choosing the cache folder when the cache holds
            several (None: its only one).
        engine: ``"local"`` or ``"ray"``.
        workers: see :class:`CascadePlan`.
        use_gpu: train on CUDA (local: device ``"cuda"``; ray: GPU workers).
        storage_path: Ray Train storage root (engine ray), outside ``model_dir``: a path
            every node sees, or a URI (``s3://``, ``gs://``, ``file://``) kept as it is.
        stage2: stage-2 overrides of ``config`` (e.g. ``{"lr": 1e-4}``); None: the same.
        stage2_source: see :class:`CascadePlan`; None: ``"oof"`` with ``use_gpu``, ``"off"``
            on CPU (on CPU, stage 2 and cross-fitting changed the test MAE by <= 0.02 y in
            benchmarks/bench_accuracy.py while costing four of the five training jobs).
            ``"insample"`` is for ablations only.
        test_fraction, split_seed: when no cached row is labelled ``test``, hold out this
            share of the unlabelled participants as the test split by the pipeline's stable
            hash (:func:`rankcore.train.split.training_split`; 0: none). The card records it.

    Returns:
        The plan (``reuse`` True when ``model_dir`` already holds this run).

    Raises:
        InputError: an empty cache, no ages, fewer training subjects than one batch (or than
            the folds need), ages that do not vary, a sorter that is missing or cannot rank
            ``batch_size`` values, a ``model_dir`` holding something else, bad arguments.
    """
    from rankcore.cache import open_cache

    cache_dir, model_dir = local_path(cache_dir, "cache_dir"), local_path(model_dir, "model_dir")
    if config is None or isinstance(config, dict):
        config = default_config(**(config or {}))
    config = TrainConfig.from_dict(config)
    k_folds = _positive_int(k_folds, "k_folds", 2)
    workers = _positive_int(workers, "workers", 1)
    if engine not in ENGINES:
        raise InputError(f"`engine` must be one of {', '.join(map(repr, ENGINES))}, "
                         f"got {engine!r}")
    if not isinstance(use_gpu, bool):
        raise InputError(f"`use_gpu` must be true or false, got {use_gpu!r}")
    if stage2_source is None:
        stage2_source = "oof" if use_gpu else "off"
    if stage2_source not in STAGE2_SOURCES:
        raise InputError(f"`stage2_source` must be one of {', '.join(map(repr, STAGE2_SOURCES))}, "
                         f"got {stage2_source!r}")
    if stage2 is not None and not isinstance(stage2, dict):
        raise InputError(f"`stage2` must be a dict of TrainConfig overrides, got "
                         f"{type(stage2).__name__}")
    device = _resolve_devices(config, engine, use_gpu)
    config = config.replace(device=device)
    config2 = TrainConfig.from_dict({**config.to_dict(), **(stage2 or {}), "device": device,
                                     **({"model": "prior"} if stage2_source == "off" else {})})
    for c in (config, config2):
        build_objective(c)  # a missing sorter or a sorter of another length fails here
        if engine == "ray" and c.batch_size % workers:
            raise InputError(f"`batch_size` must be a multiple of the number of workers "
                             f"({workers}), got {c.batch_size}")

    view = open_cache(cache_dir, preprocess)
    where = f"cache {str(view.layout.folder)!r}"
    table = view.table
    columns = {c: table.column(c).to_pylist() for c in (*DIGEST_COLUMNS, "participant_id")}
    digest = cache_data_digest(view.layout.digest, columns)
    ages_all = np.array([np.nan if a is None else a for a in columns["age"]], dtype=np.float64)
    split = training_split(columns["key"], ages_all, columns["site"], columns["split"],
                           val_fraction=val_fraction, seed=config.seed, where=where,
                           participant_ids=columns["participant_id"],
                           test_fraction=test_fraction, split_seed=split_seed)
    age_of = dict(zip(columns["key"], ages_all.tolist()))
    train_ages = np.array([age_of[k] for k in split.train])
    val_ages = tuple(age_of[k] for k in split.val)
    batch = max(config.batch_size, config2.batch_size)
    if len(train_ages) < batch:
        raise InputError(f"{where} has {len(train_ages)} training subject(s) with an age "
                         f"({len(split.val)} more set aside for validation), fewer than one "
                         f"batch (batch_size {batch}): ingest more subjects or lower the batch "
                         "size")
    if float(np.std(train_ages)) == 0.0:
        raise InputError(f"{where}: the training ages must vary (all are {train_ages[0]:g}); "
                         "there is nothing to rank or regress")
    folds = stratified_folds(train_ages, k_folds, config.seed) if len(train_ages) >= k_folds \
        else np.zeros(len(train_ages), dtype=np.int64)
    smallest = len(train_ages) - int(np.bincount(folds, minlength=k_folds).max())
    if smallest < config.batch_size:
        raise InputError(f"`k_folds` = {k_folds} leaves fold models {smallest} training "
                         f"subject(s) of the {len(train_ages)} in {where}, fewer than "
                         f"batch_size {config.batch_size}: use fewer folds, a smaller batch or "
                         "more subjects")

    key = training_key(config, config2, k_folds, val_fraction, digest, stage2_source, split.test)
    model_dir = model_dir.expanduser().absolute()
    reuse = check_model_dir(model_dir, key, config, k_folds, digest)
    staging = model_dir.parent / f"{model_dir.name}.tmp-{key[:12]}"
    from rankcore.train.storage import is_uri

    if storage_path is not None and not is_uri(storage_path):  # a URI is passed on as is
        storage = Path(storage_path).expanduser().absolute()
        if storage == model_dir or model_dir in storage.parents:
            raise InputError(f"`storage_path` must lie outside `model_dir` {str(model_dir)!r}, "
                             f"got {str(storage)!r}")
    return CascadePlan(
        cache_dir=str(cache_dir.expanduser().absolute()),
        preprocess=view.config.to_dict(), preproc_digest=view.layout.digest,
        model_dir=str(model_dir), staging_dir=str(staging), config=config.to_dict(),
        stage2_config=config2.to_dict(), k_folds=k_folds, engine=engine, workers=workers,
        use_gpu=use_gpu, storage_path=None if storage_path is None else str(storage_path),
        data_digest=digest, training_key=key, split=split.to_dict(),
        train_ages=tuple(train_ages.tolist()), val_ages=val_ages,
        folds=tuple(int(f) for f in folds), reuse=reuse, stage2_source=stage2_source)
