"""Predictions of a finished stage (or a whole cascade) as Ray tasks that read the cache.

:func:`predict_ray` cuts a :class:`~rankcore.train.cache_split.CacheSplit` into chunks of
``chunk_size`` subjects and runs one Ray task per chunk (1 CPU, or 1 GPU with ``use_gpu``),
at most ``workers`` at a time. Each task receives the stage files as bytes (safetensors
weights and the JSON card: no pickled tensors), opens the cache, reads its chunk's rows batch
by batch and returns the ages: the driver holds neither volumes nor more than ``workers``
chunks' results in flight, and every subject's histogram counts are computed once, by the
task that reads its row. A cascade (stage 1 then stage 2) runs both stages in the same task,
so stage 2 gets stage 1's estimates without a round trip.

The forward passes use each stage card's settings (flip test-time augmentation, autocast,
channels-last), as :func:`rankcore.train.predict.predict` does in-process; both give the same
ages for the same weights and rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.train.cache_split import CacheSplit
from rankcore.train.checkpoint import CARD_FILE, MODEL_FILE, load_stage_model

__all__ = ["DEFAULT_CHUNK", "StageFiles", "predict_ray"]

log = logging.getLogger("rankcore.inference")

#: Subjects per Ray task (bounds a task's memory and the work lost when one fails).
DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class StageFiles:
    """A finished stage folder's two files as bytes, to rebuild the model in another process.

    Attributes:
        weights: ``model.safetensors``.
        card: ``card.json`` (text).
    """

    weights: bytes
    card: str

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> StageFiles:
        """Read a stage folder written by the training loop (checked by :meth:`load`)."""
        folder = Path(folder)
        try:
            return cls((folder / MODEL_FILE).read_bytes(), (folder / CARD_FILE).read_text())
        except OSError as err:
            raise InputError(f"`stage` folder {str(folder)!r} must hold a finished stage, "
                             f"got {err}") from None

    def load(self, device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
        """(model in eval mode on ``device``, card), with the checks of load_stage_model."""
        with tempfile.TemporaryDirectory(prefix="brainrank-stage-") as tmp:
            (Path(tmp) / MODEL_FILE).write_bytes(self.weights)
            (Path(tmp) / CARD_FILE).write_text(self.card)
            return load_stage_model(tmp, device)


def _predict_kwargs(card: dict[str, Any], batch_size: int | None) -> dict[str, Any]:
    cfg = card.get("train_config") or {}
    return {"batch_size": int(batch_size or cfg.get("eval_batch_size", 32)),
            "flip_tta": bool(cfg.get("flip_tta", False)),
            "channels_last": bool(cfg.get("channels_last", False)),
            "amp": bool(cfg.get("amp", False))}


def predict_chunk(stages: Sequence[StageFiles], split: CacheSplit, use_gpu: bool = False,
                  batch_size: int | None = None, num_threads: int | None = 1
                  ) -> list[np.ndarray]:
    """Body of one task: the ages (float64, in the order of ``split``) of every stage.

    With two stages the second is a stage-2 model fed the first one's estimates.
    """
    import torch

    from rankcore.train.predict import predict

    if use_gpu:
        from rankcore.train.ray_train import require_cuda

        require_cuda("a Ray prediction task")
    device = torch.device("cuda" if use_gpu else "cpu")
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        data = split.load(preload=False)
        out: list[np.ndarray] = []
        for j, files in enumerate(stages):
            model, card = files.load(device)
            if j > 0:
                data = data.with_stage1(out[-1])
            out.append(predict(model, data, **_predict_kwargs(card, batch_size)))
        return out
    finally:
        torch.set_num_threads(threads)


def predict_ray(stages: Sequence[StageFiles | str | os.PathLike[str]], split: CacheSplit, *,
                workers: int = 2, use_gpu: bool = False, chunk_size: int = DEFAULT_CHUNK,
                batch_size: int | None = None) -> list[np.ndarray]:
    """Ages of every subject of ``split`` from one stage, or a cascade, as Ray tasks.

    Args:
        stages: one stage (folder or :class:`StageFiles`; a stage-2 model needs ``split``
            to carry stage-1 estimates), or two: stage 1 then stage 2 (a cascade).
        split: the subjects, by cache root and keys (read by the tasks, not here).
        workers: tasks at a time (one CPU each, or one GPU each with ``use_gpu``).
        use_gpu: run the tasks on GPU workers (CUDA is checked in each task).
        chunk_size: subjects per task.
        batch_size: subjects per forward pass (None: each card's ``eval_batch_size``).

    Returns:
        One float64 array (N,) per stage, in the order of ``split``.

    Raises:
        InputError: bad arguments, a folder without a finished stage, unknown keys, or
            ``use_gpu`` on a worker without CUDA.
    """
    import ray

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"`workers` must be a positive integer, got {workers!r}")
    if not 1 <= len(stages) <= 2:
        raise InputError(f"`stages` must hold one stage or two (a cascade), got {len(stages)}")
    files = [s if isinstance(s, StageFiles) else StageFiles.read(s) for s in stages]
    chunks = split.chunks(chunk_size)
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:  # an autoscaler may add some
        log.warning("prediction tasks wait for a GPU worker; the Ray cluster has none now")
    remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0,
                        max_retries=1)(predict_chunk)
    files_ref = ray.put(files)
    results: dict[int, list[np.ndarray]] = {}
    pending: dict[Any, int] = {}
    todo = list(enumerate(chunks))
    try:
        while todo or pending:
            while todo and len(pending) < workers:
                i, part = todo.pop(0)
                pending[remote.remote(files_ref, part, use_gpu, batch_size)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    # The task's own exception (its str is our one line; the str of
                    # as_instanceof_cause() carries Ray's remote traceback).
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, InputError):
                        raise InputError(str(cause)) from None
                    raise
    finally:
        for ref in pending:
            ray.cancel(ref)
    if not chunks:
        return [np.zeros(0) for _ in files]
    return [np.concatenate([results[i][j] for i in range(len(chunks))])
            for j in range(len(files))]
