"""Prefect tasks of the ingest flow: thin wrappers around rankcore.mri and rankcore.cache.

A subject batch is the retry unit (``ingest_batch_task``, retries=1): it writes one shard
atomically, so a retried batch never leaves half a shard behind. Planning, committing and
finalising run in the flow's process, which holds the cache lock. The caching of results is
rankcore.cache's own (content-addressed), so Prefect's task cache is off.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from rankcore.cache import (
    Batch,
    BatchResult,
    IngestPlan,
    IngestSummary,
    ensure_ray,
    execute_plan,
    finalize_ingest,
    plan_ingest,
    process_batch,
)
from rankcore.mri import Cohort, PreprocessConfig, read_cohort


@task(name="read-cohort", retries=0, cache_policy=NO_CACHE)
def read_cohort_task(cohort: str, allow_outside_root: bool, require_age: bool) -> Cohort:
    """Parse a BIDS root or manifest into rows and table-level quarantine entries."""
    return read_cohort(cohort, allow_outside_root=allow_outside_root, require_age=require_age)


@task(name="plan-ingest", retries=0, cache_policy=NO_CACHE)
def plan_ingest_task(cohort: Cohort, cache_dir: str, config: PreprocessConfig,
                     batch_size: int | None = None, workers: int = 1) -> IngestPlan:
    """Verify the cache and decide what to reuse and what to process (needs the cache lock).

    ``batch_size`` None: the library's default batches (up to 64 subjects, fewer so that
    each of ``workers`` gets one; see ``rankcore.cache.plan.default_batch_size``).
    """
    return plan_ingest(cohort, cache_dir, config, batch_size=batch_size, workers=workers)


@task(name="ingest-batch", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def ingest_batch_task(batch: Batch) -> BatchResult:
    """Digest, preprocess and write one subject batch as one shard."""
    return process_batch(batch)


@task(name="ingest-batches-ray", retries=0, cache_policy=NO_CACHE)
def ingest_batches_ray_task(plan: IngestPlan, workers: int, ray_address: str | None) -> None:
    """Run every batch as a Ray task (each retried once by Ray) and commit each shard.

    Joins the cluster at ``ray_address`` when given, else starts a local Ray with ``workers``
    CPUs unless Ray is already initialised; shuts down only what it started.
    """
    import ray

    started = ensure_ray(ray_address, workers)
    try:
        execute_plan(plan, engine="ray", workers=workers)
    finally:
        if started:
            ray.shutdown()


@task(name="finalize-ingest", retries=0, cache_policy=NO_CACHE)
def finalize_ingest_task(plan: IngestPlan, seconds: float) -> IngestSummary:
    """Compact superseded rows, complete the manifest, write the quarantine table."""
    return finalize_ingest(plan, seconds=seconds)
