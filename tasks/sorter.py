"""Prefect task of sorter pretraining: a thin wrapper around rankcore.train's launchers.

The whole run is the retry unit, and it is not retried by Prefect: Ray Train restarts dead
workers from the last checkpoint itself (``max_failures``), and a rerun of the flow with the
same configuration reuses a finished sorter file (or resumes the Ray run) instead of retraining.
Ray Train is called from INSIDE this task (not through a Prefect Ray task runner), so the Ray
workers never talk to Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from rankcore.train.sorter import pretrain_sorter_local
from rankcore.train.sorter_state import finished_sorter


@task(name="pretrain-sorter", retries=0, cache_policy=NO_CACHE)
def pretrain_sorter_task(out: str, config: dict[str, Any], *, engine: str, workers: int,
                         gpu: bool, storage_path: str | None, ray_address: str | None,
                         max_failures: int, fail_at_step: int | None) -> dict[str, Any]:
    """Train a sorter (or reuse ``out`` when it holds this config's sorter); return its card.

    Args:
        out: destination ``.safetensors`` file.
        config: a ``rankcore.train.sorter_config.SorterTrainConfig`` as a dict.
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Train, ``workers`` workers).
        workers, gpu, storage_path, ray_address, max_failures, fail_at_step: see
            :func:`rankcore.train.sorter_ray.train_sorter_ray`.
    """
    logger = get_run_logger()
    card = finished_sorter(out, config)
    if card is not None and fail_at_step is None:
        logger.info("reusing %s: it holds a finished sorter of this configuration", out)
        return {**card, "reused": True}
    if engine == "local":
        return pretrain_sorter_local(config, out, checkpoint_dir=storage_path)
    from rankcore.train.sorter_ray import train_sorter_ray

    return train_sorter_ray(config, out, num_workers=workers, use_gpu=gpu,
                            storage_path=storage_path, max_failures=max_failures,
                            ray_address=ray_address, fail_at_step=fail_at_step)
