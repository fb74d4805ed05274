"""Where subject batches run: in-process, in a local process pool, or as Ray tasks.

Every engine runs the same ``process_batch`` on the same batches, so the shards they write
are identical; only the order in which results arrive differs. Ray is imported lazily.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from rankcore.cache.batch import Batch, BatchResult, process_batch
from rankcore.errors import InputError

ENGINES = ("local", "ray")


def check_engine(engine: str) -> str:
    """Return ``engine`` when it is one of ENGINES, else raise InputError.

    (Not rankcore._validate.check_choice: that module imports torch, which batch workers
    never need.)
    """
    if engine not in ENGINES:
        raise InputError(f"`engine` must be one of {', '.join(map(repr, ENGINES))}, "
                         f"got {engine!r}")
    return engine


def check_workers(workers: int) -> int:
    """Return ``workers`` when it is an int >= 1, else raise InputError."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"`workers` must be an integer >= 1, got {workers!r}")
    return workers


def run_batches(batches: Sequence[Batch], *, engine: str = "local",
                workers: int = 1) -> Iterator[BatchResult]:
    """Run ``process_batch`` on every batch; yield results as they complete.

    Args:
        batches: the batches to run.
        engine: "local" (a process pool of ``workers`` processes; in-process when
            ``workers == 1``) or "ray" (one Ray task per batch, retried once).
        workers: local processes, or the CPUs of a Ray cluster started here when none is
            running.

    Closing the iterator early cancels the batches not yet started.
    """
    check_engine(engine)
    check_workers(workers)
    if engine == "ray":
        yield from _run_ray(batches, workers)
    elif workers == 1 or len(batches) <= 1:
        for batch in batches:
            yield process_batch(batch)
    else:
        yield from _run_pool(batches, workers)


def _run_pool(batches: Sequence[Batch], workers: int) -> Iterator[BatchResult]:
    # spawn, not fork: the parent may hold threads (Prefect, torch) that fork would copy mid-state.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=ctx)
    pending = {pool.submit(process_batch, b) for b in batches}
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless already connected; return True when this call started it.

    ``address`` joins an existing cluster ("auto", "ray://host:10001", "host:6379");
    without it a local cluster with ``num_cpus`` CPUs is started, bound to this process: it
    ends when this process dies, even by kill -9 (:mod:`rankcore._reaper`).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from rankcore._reaper import reap_descendants_on_death

        reap_descendants_on_death()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _run_ray(batches: Sequence[Batch], workers: int) -> Iterator[BatchResult]:
    import ray

    started = ensure_ray(num_cpus=workers)
    pending: list = []
    try:
        remote = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=True)(process_batch)
        pending = [remote.remote(b) for b in batches]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()
