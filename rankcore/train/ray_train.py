"""Ray Train (V2) launcher: the same :func:`train_stage` on W workers with a global-batch loss.

``train_stage_ray`` starts a ``TorchTrainer`` whose workers each run :func:`train_stage` with a
:class:`rankcore.train.dist.TorchDistWorld` (gloo on CPU, NCCL on GPU). Every worker sees the
same subjects in the same order, so the global batches are those of the single-process run
and the ranking terms are computed on all of them at once. Cohorts travel as a
:class:`~rankcore.train.cache_split.CacheSplit` (cache root + keys): each worker opens the
Parquet cache itself and reads only the rows of its own share of each batch, so the driver
holds no volume. (A small in-memory :class:`SubjectData` is shipped by value: tests, demos.)

GPU workers: ``use_gpu`` asks Ray for one GPU per worker; CUDA is checked on each worker, not
in the driver, whose node (a cluster's head) may have none.

Checkpoints: rank 0 hands each epoch folder to ``ray.train.report`` (every worker reports each
epoch: it is a barrier); Ray keeps them under ``storage_path/name``, where ``storage_path`` is
a path every node sees or a URI (``s3://``, ``gs://``, ``file://``; passed to Ray as is). A
worker failure restarts the workers from the latest reported epoch
(``FailureConfig(max_failures)``), and calling ``train_stage_ray`` again with the same
``storage_path`` and ``name`` resumes an interrupted run. At the end the final stage files
(best weights + card) are copied into ``out_dir``.

Ray is imported inside the functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankcore.errors import InputError, TrainingError
from rankcore.train.cache_split import CacheSplit
from rankcore.train.checkpoint import CARD_FILE, MODEL_FILE, OPTIMIZER_FILE, load_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData, as_subject_data
from rankcore.train.loop import StageResult, _validate, train_stage
from rankcore.train.objective import build_objective
from rankcore.train.storage import storage_location

log = logging.getLogger("rankcore.train")

__all__ = ["CacheSplit", "build_trainer", "global_batch_objective", "require_cuda",
           "train_stage_ray"]


def require_cuda(what: str) -> None:
    """Raise InputError unless this process sees a CUDA device (run where the work runs).

    Args:
        what: names the process in the message (e.g. ``"Ray Train worker 1"``).
    """
    if not torch.cuda.is_available():
        import socket

        raise InputError(f"`use_gpu` needs CUDA on every worker, got none on {what} "
                         f"(host {socket.gethostname()}): give the cluster GPU workers or "
                         "drop --gpu")


def _materialise(spec: Any, name: str) -> SubjectData | None:
    if spec is None:
        return None
    if isinstance(spec, CacheSplit):
        return spec.load()
    return as_subject_data(spec, name)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Body of every Ray Train worker (rebuilds the config from a plain dict)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from rankcore.train.dist import TorchDistWorld

    world = TorchDistWorld()
    config = TrainConfig.from_dict(cfg["config"])
    if cfg["use_gpu"]:
        require_cuda(f"Ray Train worker {world.rank}")
        torch.cuda.set_device(ray.train.torch.get_device())
        config = config.replace(device="cuda")
    train = _materialise(cfg["train"], "train_data")
    val = _materialise(cfg["val"], "val_data")
    local = Path(tempfile.mkdtemp(prefix=f"brainrank-rank{world.rank}-"))
    try:
        resume: bool | Path = False
        restored = ray.train.get_checkpoint()
        if restored is not None:
            resume = local / "restored"
            restored.to_directory(str(resume))
            if not (resume / OPTIMIZER_FILE).exists():  # the run had already finished
                _report_final(world.rank, resume)
                return
        fail_at = cfg.get("fail_at_epoch")

        def report(metrics: dict[str, Any], path: Path | None) -> None:
            ckpt = Checkpoint.from_directory(str(path)) if path is not None else None
            ray.train.report(_numbers(metrics), checkpoint=ckpt,
                             delete_local_checkpoint_after_upload=False)
            if fail_at is not None and restored is None and metrics["epoch"] == fail_at:
                raise RuntimeError(f"injected failure after epoch {fail_at + 1} (test hook)")

        train_stage(cfg["stage"], config, train, val, out_dir=local / "stage", report=report,
                    world=world, resume=resume)
        _report_final(world.rank, local / "stage")
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _report_final(rank: int, stage_dir: Path) -> None:
    """Report the finished stage (model + card) as the run's last checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    ckpt = None
    if rank == 0:
        final = stage_dir.parent / "final"
        final.mkdir(exist_ok=True)
        for name in (MODEL_FILE, CARD_FILE):
            shutil.copy2(stage_dir / name, final / name)
        ckpt = Checkpoint.from_directory(str(final))
    ray.train.report({"finished": 1.0}, checkpoint=ckpt,
                     delete_local_checkpoint_after_upload=False)


def _unwrap(err: BaseException) -> BaseException | None:
    """The first InputError / TrainingError a worker raised, if that is why the run failed."""
    failures = getattr(err, "worker_failures", None) or {}
    for exc in failures.values():
        for e in (exc, getattr(exc, "cause", None), getattr(exc, "__cause__", None)):
            if isinstance(e, InputError | TrainingError):
                return e
    return None


def train_stage_ray(stage: int, config: TrainConfig | dict[str, Any], train_data: Any,
                    val_data: Any = None, *, out_dir: str | Path, num_workers: int = 2,
                    use_gpu: bool = False, storage_path: str | Path | None = None,
                    name: str | None = None, max_failures: int = 0,
                    _fail_at_epoch: int | None = None) -> StageResult:
    """Train one stage with Ray Train on ``num_workers`` workers; see the module docstring.

    Args:
        stage: 1 or 2 (as :func:`train_stage`).
        config: the training config; ``batch_size`` is the global batch.
        train_data, val_data: a :class:`CacheSplit` (each worker reads its rows from the
            cache; the driver reads metadata only) or a small :class:`SubjectData` (shipped to
            every worker by value).
        out_dir: receives ``model.safetensors`` and ``card.json`` of the finished stage.
        num_workers: Ray Train workers (1 CPU, or 1 GPU with ``use_gpu``, each).
        use_gpu: NCCL + CUDA workers (bf16 autocast when ``config.amp``); else gloo on CPU.
            CUDA is checked on the workers (the driver's node may have no GPU).
        storage_path: where Ray keeps run state and checkpoints: a path every node sees or a
            URI (``s3://``, ``gs://``, ``file://``), passed to Ray unchanged (default:
            ``out_dir/ray``).
        name: Ray run name (default ``stage{stage}``); same storage + name resumes a run.
        max_failures: worker-group restarts allowed (each resumes from the latest epoch).
        _fail_at_epoch: test hook: every worker raises after reporting this epoch, in the
            first attempt only (exercises the failure/resume path).

    Returns:
        A :class:`StageResult` (the model loaded from ``out_dir``).

    Raises:
        InputError: unusable data or config (checked in the driver before Ray starts), or
            ``use_gpu`` with a worker that has no CUDA.
        TrainingError: the loss became NaN, or the run failed after ``max_failures`` retries.
    """
    import ray
    import ray.train

    config = TrainConfig.from_dict(config)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise InputError(f"`num_workers` must be a positive integer, got {num_workers!r}")
    if not isinstance(use_gpu, bool):
        raise InputError(f"`use_gpu` must be true or false, got {use_gpu!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (out_dir / CARD_FILE).exists():
        raise InputError(f"`out_dir` {str(out_dir)!r} already holds a trained stage")
    # Validate in the driver, so bad input fails fast and before Ray writes anything; a
    # CacheSplit is opened without its volumes (metadata only).
    local_train = train_data if isinstance(train_data, CacheSplit) else as_subject_data(
        train_data, "train_data")
    check_train = (local_train.load(preload=False) if isinstance(local_train, CacheSplit)
                   else local_train)
    local_val = None if val_data is None else (
        val_data if isinstance(val_data, CacheSplit) else as_subject_data(val_data, "val_data"))
    check_val = (local_val.load(preload=False) if isinstance(local_val, CacheSplit)
                 else local_val)

    class _Size:
        rank, world_size = 0, num_workers

    _validate(stage, config, check_train, check_val, _Size())
    build_objective(config)
    del check_train, check_val
    if use_gpu and ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < num_workers:  # an autoscaler may still add GPU nodes: say why we wait
            log.warning("stage %d waits for %d GPU worker(s); the Ray cluster has %g GPU(s) "
                        "now", stage, num_workers, gpus)
    trainer = build_trainer(
        {"stage": stage, "config": config.to_dict(), "train": local_train, "val": local_val,
         "use_gpu": use_gpu, "fail_at_epoch": _fail_at_epoch},
        num_workers=num_workers, use_gpu=use_gpu,
        storage_path=storage_path if storage_path is not None else out_dir / "ray",
        name=name or f"stage{stage}", max_failures=max_failures)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        cause = _unwrap(err)
        if cause is not None:
            raise type(cause)(str(cause)) from err
        raise TrainingError(f"stage {stage}: Ray Train run failed: {err}") from err
    if result.checkpoint is None:
        raise TrainingError(f"stage {stage}: Ray Train finished without a checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        result.checkpoint.to_directory(tmp)
        for fname in (MODEL_FILE, CARD_FILE):  # card last: its presence marks completion
            staged = Path(tmp) / fname
            os.replace(staged, out_dir / fname)
    model, card = load_stage_model(out_dir)
    return StageResult(model, card["history"], card["best_epoch"], out_dir, card)


def build_trainer(loop_config: dict[str, Any], *, num_workers: int, use_gpu: bool,
                  storage_path: str | os.PathLike[str], name: str, max_failures: int = 0):
    """The ``TorchTrainer`` of :func:`train_stage_ray` (built, not started).

    ``storage_path`` goes to ``RunConfig`` through
    :func:`rankcore.train.storage.storage_location`: a URI unchanged, a path made absolute.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_location(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


def _probe_loop(cfg: dict[str, Any]) -> None:
    """Worker body of :func:`global_batch_objective`."""
    import ray.train

    from rankcore.train.dist import TorchDistWorld

    world = TorchDistWorld()
    pred_all = torch.tensor(cfg["pred"], dtype=torch.float64)
    target_all = torch.tensor(cfg["target"], dtype=torch.float64)
    n = len(pred_all) // world.world_size
    sl = slice(world.rank * n, (world.rank + 1) * n)
    pred = pred_all[sl].clone().requires_grad_(True)
    objective = build_objective(TrainConfig.from_dict(cfg["config"])).double()
    total, parts = objective(world.all_gather(pred), world.all_gather(target_all[sl]))
    total.backward()
    out = {"rank": world.rank, "total": float(total), "rank_term": float(parts["rank"]),
           "grad": pred.grad.tolist()}
    path = Path(cfg["out"]) / f"rank{world.rank}.json"
    path.write_text(json.dumps(out))
    ray.train.report({"total": float(total)})


def global_batch_objective(config: TrainConfig | dict[str, Any], pred: Any, target: Any, *,
                           num_workers: int = 2) -> list[dict[str, Any]]:
    """Evaluate the training objective on one global batch split over Ray Train workers.

    Worker r holds the r-th slice of ``pred`` / ``target`` (float64), all-gathers them
    (differentiably) and computes the objective on the gathered batch, then backpropagates to
    its own slice. A diagnostic of the distributed objective: every worker's ``total`` must
    equal the single-process value, and ``grad`` must be ``num_workers`` times the
    single-process gradient of its slice (DDP then averages over workers).

    Returns:
        One dict per worker, by rank: ``total``, ``rank_term`` and ``grad`` (list).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 1 or len(pred) % num_workers:
        raise InputError(f"`pred` and `target` must be equal 1-d arrays whose length is a "
                         f"multiple of num_workers={num_workers}, got {pred.shape} and "
                         f"{target.shape}")
    config = TrainConfig.from_dict(config)
    with tempfile.TemporaryDirectory(prefix="brainrank-probe-") as tmp:
        TorchTrainer(
            _probe_loop,
            train_loop_config={"config": config.to_dict(), "pred": pred.tolist(),
                               "target": target.tolist(), "out": tmp},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers),
            run_config=RunConfig(name="probe", storage_path=str(Path(tmp) / "ray")),
        ).fit()
        out = []
        for r in range(num_workers):
            with contextlib.suppress(FileNotFoundError):
                out.append(json.loads((Path(tmp) / f"rank{r}.json").read_text()))
    if len(out) != num_workers:
        raise TrainingError(f"only {len(out)} of {num_workers} workers reported")
    return out
