"""Ray Train (V2) launcher of sorter pretraining: W workers, checkpoints, failure recovery.

``train_sorter_ray`` runs :func:`rankcore.train.sorter.ray_worker_loop` on ``num_workers``
Ray Train workers (``TorchTrainer``; gloo on CPU, NCCL on GPU; gradients averaged by
DistributedDataParallel). Every ``checkpoint_every`` steps rank 0 hands a checkpoint folder to
``ray.train.report``; Ray persists it under ``storage_path/name``. When a worker dies, Ray
restarts the worker group (up to ``max_failures`` times) and every worker resumes from the
latest checkpoint; calling ``train_sorter_ray`` again with the same storage and name resumes an
interrupted run (and a finished one is simply copied out again). The run name defaults to
``sorter-<kind>-<config digest>``, so a changed configuration never resumes another's state.

``storage_path`` is a local folder (default: a ``<out stem>.ray`` folder next to ``out``) or
any URI a pyarrow filesystem understands (``s3://...``, ``gs://...``), which every worker
must be able to reach on a multi-node cluster.

Ray is imported inside the functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rankcore.errors import InputError, TrainingError
from rankcore.train.sorter import ray_worker_loop
from rankcore.train.sorter_config import SorterTrainConfig
from rankcore.train.sorter_state import write_sorter_file

__all__ = ["FAIL_MARKER", "default_run_name", "train_sorter_ray"]

#: File (under ``storage/name``) that records the ``fail_at_step`` test hook has fired.
FAIL_MARKER = "fail_at_step.marker"


def default_run_name(config: SorterTrainConfig) -> str:
    """``sorter-<kind>-<first 12 hex digits of the config digest>``."""
    return f"sorter-{config.kind}-{config.digest()[:12]}"


def _storage(storage_path: str | os.PathLike[str] | None, out: Path) -> str:
    if storage_path is None:
        return str((out.parent / f"{out.stem}.ray").resolve())
    s = str(storage_path)
    return s if "://" in s else str(Path(s).expanduser().resolve())


def _connect(ray_address: str | None, num_workers: int, use_gpu: bool) -> bool:
    """Make sure Ray runs; return True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        from rankcore.cache.engines import start_local_ray  # loopback only, ends with us

        gpus = torch.cuda.device_count() if use_gpu else 0
        start_local_ray(num_cpus=max(2, num_workers), num_gpus=gpus)
    return True


def _cause(err: BaseException) -> BaseException | None:
    """The first InputError / TrainingError a worker raised, if that is why the run failed."""
    for exc in (getattr(err, "worker_failures", None) or {}).values():
        for e in (exc, getattr(exc, "cause", None), getattr(exc, "__cause__", None)):
            if isinstance(e, InputError | TrainingError):
                return e
    return None


def train_sorter_ray(config: SorterTrainConfig | dict[str, Any], out: str | os.PathLike[str], *,
                     num_workers: int = 2, use_gpu: bool = False,
                     storage_path: str | os.PathLike[str] | None = None, name: str | None = None,
                     max_failures: int = 2, ray_address: str | None = None,
                     fail_at_step: int | None = None) -> dict[str, Any]:
    """Pretrain a sorter with Ray Train and write it to ``out``; return its card.

    Args:
        config: the run's configuration; ``batch_size`` is per worker.
        out: destination ``.safetensors`` sorter file (card also written as ``.json``).
        num_workers: Ray Train workers (1 CPU each, plus 1 GPU each with ``use_gpu``).
        use_gpu: NCCL + CUDA workers; else gloo on CPU.
        storage_path: local folder or pyarrow URI for run state and checkpoints.
        name: run name (default :func:`default_run_name`); same storage + name resumes.
        max_failures: worker-group restarts allowed, each resuming from the last checkpoint.
        ray_address: cluster to join (else ``RAY_ADDRESS``, else a local
            ``ray.init(num_cpus=max(2, num_workers))``); ignored when Ray already runs here.
        fail_at_step: test hook: the last worker raises once after this step.

    Returns:
        The card of the sorter written to ``out``.

    Raises:
        InputError: bad arguments or config (checked before Ray starts).
        TrainingError: the run failed after ``max_failures`` restarts, or produced no sorter.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config = SorterTrainConfig.from_dict(config)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"`out` must end in .safetensors, got {str(out)!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise InputError(f"`num_workers` must be a positive integer, got {num_workers!r}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise InputError(f"`max_failures` must be an integer >= 0, got {max_failures!r}")
    if use_gpu and not torch.cuda.is_available() and not ray_address:
        raise InputError("`use_gpu` needs CUDA (or a Ray cluster with GPUs via `ray_address`)")
    storage = _storage(storage_path, out)
    run_name = name or default_run_name(config)
    if fail_at_step is not None:
        config = config.replace(fail_at_step=fail_at_step,
                                fail_marker=f"{storage.rstrip('/')}/{run_name}/{FAIL_MARKER}")
    config = config.replace(device="cuda" if use_gpu else "cpu")
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    started = _connect(ray_address, num_workers, use_gpu)
    try:
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={"config": config.to_dict(), "use_gpu": use_gpu},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            cause = _cause(err)
            if cause is not None:
                raise type(cause)(str(cause)) from err
            raise TrainingError(f"sorter pretraining failed on Ray Train: {err}") from err
        if result.checkpoint is None:
            raise TrainingError("Ray Train finished without a checkpoint")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
            folder = result.checkpoint.to_directory(tmp)
            extra = {"engine": "ray", "ray_run": run_name, "ray_storage": storage,
                     "max_failures": max_failures, "use_gpu": use_gpu}
            return write_sorter_file(out, folder, extra)
    finally:
        if started:
            ray.shutdown()
