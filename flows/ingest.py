"""Flow `ingest`: validate, preprocess and cache a cohort (BIDS root or manifest file).

Run it as `brainrank ingest COHORT --cache CACHE_DIR` or `python -m flows.ingest ...`.
Engine "local" runs each subject batch as a Prefect task (retried once), in a process pool
when ``workers > 1``; engine "ray" runs the batches as Ray tasks from inside one Prefect task
(no prefect-ray). Either way the flow process holds the cache lock and commits each shard as
its batch finishes, so an interrupted run keeps its finished batches.
"""

from __future__ import annotations

import sys
import time

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows._server import temporary_server
from flows.params import IngestParams
from rankcore.cache import CacheLayout, IngestPlan, cache_lock, commit_batch
from rankcore.mri import PreprocessConfig
from rankcore.progress import progress_bar
from tasks.ingest import (
    finalize_ingest_task,
    ingest_batch_task,
    ingest_batches_ray_task,
    plan_ingest_task,
    read_cohort_task,
)


class _Progress:
    """The run's ``ingest-progress`` artifact: percent of the subjects to process, done."""

    def __init__(self, plan: IngestPlan) -> None:
        self.todo, self.done = max(plan.n_todo, 1), 0
        self.id = create_progress_artifact(
            0.0 if plan.n_todo else 100.0, key="ingest-progress",
            description=f"ingest: {plan.n_todo} subject(s) to process")

    def add(self, subjects: int) -> None:
        self.done += subjects
        update_progress_artifact(self.id, round(100.0 * min(self.done / self.todo, 1.0), 1),
                                 description=f"ingest: {self.done} of {self.todo} subject(s)")


def _run_local(plan: IngestPlan, workers: int, artifact: _Progress) -> None:
    """Each batch as a task: in this process for one worker, else in a process pool."""
    if not plan.batches:
        return
    with progress_bar("ingest", len(plan.batches), unit="batch") as bar:
        if workers == 1:
            for done, batch in enumerate(plan.batches, 1):
                commit_batch(plan, ingest_batch_task(quote(batch)))
                bar(done)
                artifact.add(len(batch.subjects))
            return
        runner = ProcessPoolTaskRunner(max_workers=min(workers, len(plan.batches)))
        with runner:
            futures = {runner.submit(ingest_batch_task, {"batch": quote(b)}): b
                       for b in plan.batches}
            for done, future in enumerate(as_completed(list(futures)), 1):
                commit_batch(plan, future.result())
                bar(done)
                artifact.add(len(futures[future].subjects))


@flow(name="ingest", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def ingest_flow(params: IngestParams) -> dict:
    """Ingest ``params.cohort`` into ``params.cache``; return the summary as a JSON-able dict.

    Keys: cache_path, preproc_digest, total, ingested, reused, relabelled, removed,
    rebuilt_shards, quarantined (count per category), n_quarantined, failed_fraction,
    quarantine_path, seconds.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    config = PreprocessConfig(spacing=params.spacing, shape=tuple(params.shape),
                              tissue=params.tissue, allow_whole_head=params.allow_whole_head)
    cohort = read_cohort_task(params.cohort, params.allow_outside_root, params.require_age)
    logger.info("cohort %s: %d image row(s), %d row(s) set aside while reading the table",
                params.cohort, len(cohort.rows), len(cohort.quarantine))
    with cache_lock(CacheLayout.for_config(params.cache, config)):
        plan = plan_ingest_task(quote(cohort), params.cache, config, params.batch_size,
                                params.workers)
        logger.info("cache %s: %d reused, %d to process in %d batch(es) on engine %s",
                    plan.layout.folder, len(plan.reused), plan.n_todo, len(plan.batches),
                    params.engine)
        artifact = _Progress(plan)
        if params.engine == "ray":
            ingest_batches_ray_task(quote(plan), params.workers, params.ray_address)
            artifact.add(plan.n_todo)
        else:
            _run_local(plan, params.workers, artifact)
        summary = finalize_ingest_task(quote(plan), time.perf_counter() - t0)
    logger.info("ingest summary: %s", summary.to_text().replace("\n", "; "))
    create_markdown_artifact(
        markdown=f"# Ingest of `{params.cohort}`\n\n{summary.to_markdown()}\n",
        key="ingest-summary", description="subjects ingested, reused and quarantined")
    return summary.to_dict()


def run_cli(params: IngestParams) -> int:
    """Run the flow, print the summary; 0 when failed fraction <= max_failed_fraction, else 3."""
    with temporary_server():
        summary = ingest_flow(params)
    cats = ", ".join(f"{k} {v}" for k, v in summary["quarantined"].items() if v) or "none"
    print(f"ingested {summary['ingested']}, reused {summary['reused']}, quarantined "
          f"{summary['n_quarantined']} of {summary['total']}")
    print(f"quarantined by category: {cats}")
    print(f"cache: {summary['cache_path']}")
    print(f"quarantine table: {summary['quarantine_path']}")
    if summary["failed_fraction"] > params.max_failed_fraction:
        print(f"brainrank ingest: error: {summary['failed_fraction']:.1%} of the cohort was "
              f"quarantined, more than --max-failed-fraction {params.max_failed_fraction:g}; "
              f"see {summary['quarantine_path']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["ingest", *sys.argv[1:]]))
