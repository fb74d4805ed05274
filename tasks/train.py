"""Prefect tasks of the train flow: thin wrappers around rankcore.train.cascade.

A training job (one fold model, the final stage 1, stage 2) is the retry unit (``retries=1``):
a retried job resumes from its latest epoch checkpoint in the run's staging folder. Bad input
and a NaN loss (``BrainrankError``) are not retried, since a retry cannot fix them. With
engine "ray" a job task starts Ray itself when it is not running (Ray Train is called from
inside the task; no prefect-ray), and the flow releases it with :func:`release_ray`.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE

import tasks._logs  # noqa: F401  (rankcore's log level)
from rankcore.errors import BrainrankError
from rankcore.progress import progress_bar
from rankcore.train.cascade import finish_cascade, run_job
from rankcore.train.cascade_plan import CascadePlan, plan_cascade

_ray_started = False


def _retry_unless_our_error(task, task_run, state) -> bool:
    """Retry condition: anything but a BrainrankError (bad input, NaN loss) is retried."""
    try:
        state.result()
    except BrainrankError:
        return False
    except BaseException:
        return True
    return True


def release_ray() -> None:
    """Shut Ray down if a job task of this process started it."""
    global _ray_started
    if _ray_started:
        import ray

        ray.shutdown()
        _ray_started = False


def _ensure_ray(address: str | None, workers: int) -> None:
    global _ray_started
    from rankcore.cache.engines import ensure_ray

    _ray_started = ensure_ray(address, workers) or _ray_started


@task(name="check-cache-complete", retries=0, cache_policy=NO_CACHE)
def cache_complete_task(cache: str, preprocess: Any, allow_incomplete: bool) -> str | None:
    """Refuse a cache left by an interrupted ingest; a warning line when it is allowed."""
    from rankcore.cache import check_complete

    return check_complete(cache, preprocess, allow_incomplete=allow_incomplete)


@task(name="plan-training", retries=0, cache_policy=NO_CACHE)
def plan_training_task(cache: str, out: str, config: dict[str, Any], k_folds: int,
                       val_fraction: float, preprocess: Any, engine: str, workers: int,
                       use_gpu: bool, storage_path: str | None,
                       stage2: dict[str, Any] | None, test_fraction: float = 0.0,
                       split_seed: int = 0) -> CascadePlan:
    """Check the cache, config and model folder; fix the split and folds (writes nothing)."""
    return plan_cascade(cache, out, config, k_folds=k_folds, val_fraction=val_fraction,
                        preprocess=preprocess, engine=engine, workers=workers,
                        use_gpu=use_gpu, storage_path=storage_path, stage2=stage2,
                        test_fraction=test_fraction, split_seed=split_seed)


@task(name="train-job", task_run_name="train-{job}", retries=1, retry_delay_seconds=2,
      retry_condition_fn=_retry_unless_our_error, cache_policy=NO_CACHE)
def train_job_task(plan: CascadePlan, job: str, progress_artifact: UUID | None = None,
                   ray_address: str | None = None) -> dict[str, Any]:
    """Train one job of the cascade (a fold model, the final stage 1 or stage 2).

    Updates the progress artifact ``progress_artifact`` (percent of all planned epochs) after
    every epoch. Returns the job summary of :func:`rankcore.train.cascade.run_job`.
    """
    if plan.engine == "ray":
        _ensure_ray(ray_address, plan.workers)

    with progress_bar(f"train {job}", plan.epochs(job), unit="epoch") as bar:
        def progress(event: dict[str, Any]) -> None:
            bar(min(int(event["epoch"]), int(event["epochs"])))
            if progress_artifact is not None:
                update_progress_artifact(
                    progress_artifact, round(100.0 * event["fraction"], 1),
                    description=f"{event['job']}: epoch {event['epoch']}/{event['epochs']}")

        return run_job(plan, job, progress)


@task(name="finish-training", retries=0, cache_policy=NO_CACHE)
def finish_training_task(plan: CascadePlan) -> dict[str, Any]:
    """Write card + curves and move the run into MODEL_DIR; return a JSON-able summary."""
    return summarise(finish_cascade(plan).card, plan.model_dir, reused=False)


def summarise(card: dict[str, Any], model_dir: str, *, reused: bool) -> dict[str, Any]:
    """The flow's return value: where the model is, what it reached, how long it took."""
    stages = card["stages"]
    return {
        "model_dir": model_dir,
        "reused": reused,
        "training_key": card["training_key"],
        "data_digest": card["data"]["digest"],
        "n_train": card["data"]["n_train"],
        "n_val": card["data"]["n_val"],
        "split_source": card["split"]["source"],
        "test_source": card["split"].get("test", {}).get("source", "none"),
        "n_test": card["split"].get("test", {}).get("n", 0),
        "metrics": card["metrics"],
        "jobs": {job: {"epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
                       "seconds": round(s["seconds"], 2)} for job, s in stages.items()},
        "seconds": round(card["seconds"], 2),
    }
