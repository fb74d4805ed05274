"""Where a saved cascade's forward passes run: in this process, or as Ray tasks on the workers.

A :class:`CascadeRunner` gives the stage-1 and final ages of subjects of a cache, each
subject predicted once, in the order given:

* engine ``"local"``: the cascade is loaded in this process on ``device``
  (:func:`rankcore.inference.model.predict_cascade` over a lazily read SubjectData);
* engine ``"ray"``: at most ``workers`` Ray tasks at a time, each reading its own rows from the
  cache (:func:`rankcore.train.ray_predict.predict_ray`), on one CPU, or on one GPU when
  ``device`` is ``"cuda"``. CUDA is then checked in the tasks, on the workers, never here: a
  CPU head node can drive GPU workers. This process ships subject keys and gets ages back; it
  reads no volume. The cache must be at a path every Ray node sees.

Both engines use each stage card's settings (flip TTA, autocast, channels-last) and give the
same ages for the same weights and rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.inference.model import predict_cascade
from rankcore.locations import local_path

__all__ = ["DEVICES", "ENGINES", "CascadeRunner", "check_engine_workers", "load_runner",
           "ray_running"]

ENGINES = ("local", "ray")
DEVICES = ("cpu", "cuda", "auto")


def check_engine_workers(engine: str, workers: int) -> tuple[str, int]:
    """``(engine, workers)`` when usable together, else InputError.

    ``workers`` is the number of Ray tasks at a time with engine ``"ray"``; the local engine
    predicts in this process, so it takes exactly 1.
    """
    if engine not in ENGINES:
        raise InputError(f"`engine` must be one of {', '.join(map(repr, ENGINES))}, "
                         f"got {engine!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"`workers` must be an integer >= 1, got {workers!r}")
    if engine == "local" and workers != 1:
        raise InputError(f"`workers` must be 1 with engine 'local' (it predicts in this "
                         f"process; engine 'ray' runs N workers), got {workers}")
    return engine, workers


@dataclass(frozen=True)
class CascadeRunner:
    """A saved cascade and where its forward passes run (built by :func:`load_runner`).

    Attributes:
        model_dir: the model folder (read again by each Ray task: stage files as bytes).
        card: its verified card.
        cascade: the loaded :class:`rankcore.models.Cascade` (engine local: on ``device``;
            engine ray: on the CPU, only to check the weights).
        engine: ``"local"`` or ``"ray"``.
        workers: Ray tasks at a time (engine ray).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (engine ray: ``"cuda"`` asks for GPU
            workers; anything else runs on CPU workers).
        batch_size: subjects per forward pass (None: each card's ``eval_batch_size``).
    """

    model_dir: Path
    card: dict[str, Any] = field(repr=False)
    cascade: Any = field(repr=False)
    engine: str = "local"
    workers: int = 1
    device: str = "cpu"
    batch_size: int | None = None

    def ages(self, cache_dir: str | Path, data: Any, preprocess: dict[str, Any]
             ) -> tuple[np.ndarray, np.ndarray]:
        """Stage-1 and final ages (float64 arrays (N,), years) of every subject of ``data``.

        Args:
            cache_dir: the cache ``data`` was opened from (engine ray: the tasks open it).
            data: :class:`rankcore.train.data.SubjectData` of cache rows (its
                ``participant_ids`` are the cache keys).
            preprocess: the cache's PreprocessConfig as a dict (its folder in ``cache_dir``).
        """
        if len(data) == 0:
            return np.zeros(0), np.zeros(0)
        if self.engine == "local":
            return predict_cascade(self.cascade, self.card, data, batch_size=self.batch_size)
        return self.ages_of_keys(cache_dir, list(data.participant_ids), preprocess)

    def ages_of_keys(self, cache_dir: str | Path, keys: Sequence[str],
                     preprocess: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`ages` of the cache rows ``keys`` as Ray tasks (any engine; Ray must run)."""
        from rankcore.train.cache_split import CacheSplit
        from rankcore.train.ray_predict import predict_ray

        root = local_path(cache_dir, "cache_dir").expanduser().absolute()  # the tasks' cwd differs
        split = CacheSplit(str(root), preload=False, keys=tuple(keys), preprocess=preprocess)
        stage1, final = predict_ray([self.model_dir / "stage1", self.model_dir / "stage2"],
                                    split, workers=self.workers, use_gpu=self.device == "cuda",
                                    batch_size=self.batch_size)
        return stage1, final


def load_runner(model_dir: str | Path, *, engine: str = "local", workers: int = 1,
                device: str = "cpu", batch_size: int | None = None) -> CascadeRunner:
    """Load and check ``model_dir`` for predictions with ``engine`` (see the module docstring).

    Raises:
        InputError: a bad engine, worker count or device; ``device="cuda"`` with engine local
            on a machine without CUDA (engine ray checks CUDA on the workers instead).
        CheckpointError: an unreadable model folder.
    """
    from rankcore.train.cascade import load_cascade
    from rankcore.train.loop import resolve_device

    check_engine_workers(engine, workers)
    if device not in DEVICES:
        raise InputError(f"`device` must be one of {', '.join(map(repr, DEVICES))}, "
                         f"got {device!r}")
    model_dir = local_path(model_dir, "model_dir").expanduser().absolute()
    cascade, card = load_cascade(model_dir, "cpu" if engine == "ray" else resolve_device(device))
    return CascadeRunner(model_dir, card, cascade, engine, workers, device, batch_size)


@contextlib.contextmanager
def ray_running(engine: str, workers: int) -> Iterator[None]:
    """With engine ``"ray"``: connected to Ray for the block (``$RAY_ADDRESS``, or a local
    instance with ``workers`` CPUs started here, bound to 127.0.0.1 and stopped after the
    block); nothing with engine ``"local"``."""
    if engine != "ray":
        yield
        return
    from rankcore.cache.engines import ensure_ray

    started = ensure_ray(num_cpus=max(workers, 1))
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
