"""Where subject batches run: in-process, in a local process pool, or as Ray tasks.

Every engine runs the same ``process_batch`` on the same batches, so the shards they write
are identical; only the order in which results arrive differs. Ray is imported lazily; a Ray
instance started here (:func:`ensure_ray`) listens on 127.0.0.1 only and ends with this
process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from rankcore.cache.batch import Batch, BatchResult, process_batch
from rankcore.errors import InputError

ENGINES = ("local", "ray")
#: glibc's mmap threshold for the Ray processes brainrank starts (bytes; see start_local_ray).
MALLOC_ENV, MALLOC_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_", "65536"


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

    ``address`` (or ``$RAY_ADDRESS``) joins an existing cluster ("auto",
    "ray://host:10001", "host:6379"): reaching it is the user's choice. Without one a local
    Ray with ``num_cpus`` CPUs is started by :func:`start_local_ray`: bound to 127.0.0.1 only
    and ended with this process.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray(num_cpus=num_cpus)
    return True


def start_local_ray(num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """Start a local Ray instance that listens on the loopback interface only.

    Every server of the instance (GCS, raylet, object manager, workers, agents) binds
    127.0.0.1, and no dashboard is started; a watchdog (:mod:`rankcore._reaper`) ends the
    instance's processes when this process dies, even by SIGKILL. ``init_kwargs`` go to
    ``ray.init`` (e.g. ``_temp_dir``).
    """
    import ray
    from ray._private import ray_constants

    from rankcore._reaper import reap_descendants_on_death

    reap_descendants_on_death()
    # Ray resolves "127.0.0.1" to the host's routable address unless it believes it runs
    # without cluster support (its macOS/Windows mode); only that choice of address changes.
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray's processes inherit this environment. A fixed mmap threshold makes glibc return
    # freed volume-sized buffers to the OS; with its default (adaptive) threshold a worker
    # reading a cohort batch by batch kept ~1 volume of heap per subject it had read.
    malloc = os.environ.get(MALLOC_ENV)
    os.environ.setdefault(MALLOC_ENV, MALLOC_MMAP_THRESHOLD)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        if malloc is None:
            os.environ.pop(MALLOC_ENV, None)


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
