"""Ingest a cohort into the Parquet cache: plan, run batches, commit each shard, compact.

Sequence (each step leaves a cache that readers accept):

1. ``plan_ingest`` (rankcore.cache.plan): verify the shards, drop corrupt ones, delete stray
   files, and decide per subject: reuse, quarantine again, or process.
2. Batches run on an engine (rankcore.cache.engines); each writes one shard atomically.
3. ``commit_batch`` adds the shard to the in-memory manifest as soon as it arrives, and
   checkpoints manifest.json (atomic replace) at most every ``CHECKPOINT_SECONDS``: rewriting
   a manifest that lists every key after each batch would cost O(cohort) per batch. When the
   ingest stops on an exception (Ctrl-C included), ``execute_plan`` writes the manifest with
   every shard committed so far before re-raising. A process killed outright loses at most
   the last ``CHECKPOINT_SECONDS`` of batches: their shards are not in the manifest, so no
   reader trusts them, the next ingest deletes them as strays and processes their subjects
   again. Either way a rerun processes only what is missing.
4. ``finalize_ingest`` rewrites the shards holding superseded, removed or relabelled rows,
   marks the manifest complete, and rewrites the quarantine table if it changed.

An unchanged cohort writes nothing at all.

Cost (``benchmarks/bench_ingest.py``: 40 simulated subjects into the default 2 mm 80x96x80
float16 cache, one process pinned to one core of a busy 2-core VM): a fresh ingest costs
~3-5 ms per subject on top of ``preprocess_file`` (~13.5 ms). Of that, per subject: the
source's sha256 ~0.55 ms (the file is read once: the hashed bytes are the ones decoded),
float16 encoding ~1.6 ms (numpy casts float32 -> float16 one value at a time), the one-row
Arrow table ~0.5 ms, the Parquet write with its page CRC, the shard's CRC-32 and the write
to the page cache ~1.6-2 ms; per ingest, ~7 fsyncs of
~4 ms each on that VM (config, shard, shard folder, quarantine table, manifest, cache folder).
A rerun on the unchanged cohort takes ~0.5 ms per subject, most of it the CRC-32 of every
shard byte.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.cache.batch import BatchResult, Preprocess
from rankcore.cache.engines import check_engine, check_workers, run_batches
from rankcore.cache.layout import (
    CacheLayout,
    atomic_write_bytes,
    cache_lock,
    parquet_bytes,
    write_manifest,
)
from rankcore.cache.plan import IngestPlan, QuarantineRecord, plan_ingest
from rankcore.cache.schema import label_values, library_version, quarantine_table, rows_to_table
from rankcore.cache.shard_writer import ShardWriter
from rankcore.cache.shards import open_shard
from rankcore.mri.types import QUARANTINE_CATEGORIES, Cohort, PreprocessConfig

logger = logging.getLogger("rankcore.cache.ingest")

#: progress(subjects_done, subjects_to_process), called after each committed batch.
Progress = Callable[[int, int], None]

#: At most this many seconds of committed batches are missing from manifest.json (the
#: work a killed ingest loses; see the module docstring).
CHECKPOINT_SECONDS = 10.0


@dataclass(frozen=True)
class IngestSummary:
    """What an ingest did. Counts are subject-sessions.

    Attributes:
        cache_path: the config's cache folder (``cache_dir/<preproc_digest>``).
        preproc_digest: PreprocessConfig.digest() of the run.
        total: rows of the cohort table, including those set aside while parsing it.
        ingested: preprocessed and written by this run.
        reused: cached rows kept (their source file is unchanged).
        relabelled: kept rows whose table values (age, sex, ...) or file stat were updated.
        removed: cached rows dropped because their key left the cohort.
        rebuilt_shards: corrupt or unreadable shards found, removed and rebuilt.
        quarantined: count per category (all categories present, zeros included).
        failed_fraction: quarantined / total (0 for an empty cohort).
        seconds: wall time.
    """

    cache_path: str
    preproc_digest: str
    total: int
    ingested: int
    reused: int
    relabelled: int
    removed: int
    rebuilt_shards: int
    quarantined: dict[str, int]
    failed_fraction: float
    seconds: float

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantine_path(self) -> str:
        """The quarantine table next to the cache."""
        folder = Path(self.cache_path)
        return str(CacheLayout(folder.parent, folder.name).quarantine_path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (adds ``n_quarantined`` and ``quarantine_path``)."""
        return {**asdict(self), "n_quarantined": self.n_quarantined,
                "quarantine_path": self.quarantine_path}

    def to_text(self) -> str:
        """A few plain lines for a terminal."""
        cats = ", ".join(f"{k} {v}" for k, v in self.quarantined.items() if v) or "none"
        return (f"ingested {self.ingested}, reused {self.reused}, quarantined "
                f"{self.n_quarantined} of {self.total} ({self.failed_fraction:.1%})\n"
                f"quarantined by category: {cats}\n"
                f"cache: {self.cache_path}")

    def to_markdown(self) -> str:
        """A Markdown table of the counts, then one row per quarantine category seen."""
        lines = ["| quantity | value |", "|---|---|"]
        for name in ("total", "ingested", "reused", "relabelled", "removed", "rebuilt_shards"):
            lines.append(f"| {name} | {getattr(self, name)} |")
        lines.append(f"| quarantined | {self.n_quarantined} |")
        lines += [f"| quarantined: {k} | {v} |" for k, v in self.quarantined.items() if v]
        lines.append(f"| failed fraction | {self.failed_fraction:.3f} |")
        lines.append(f"| seconds | {self.seconds:.1f} |")
        lines.append(f"| cache | `{self.cache_path}` |")
        return "\n".join(lines)


def save_manifest(plan: IngestPlan) -> None:
    """Write manifest.json now (atomic replace) with every shard committed so far."""
    write_manifest(plan.layout, plan.manifest)
    plan.manifest_unsaved = False
    plan.manifest_saved_at = time.monotonic()


def commit_batch(plan: IngestPlan, result: BatchResult) -> None:
    """Record a finished batch: add its shard to the manifest and log each subject.

    manifest.json itself is rewritten when the last write is ``CHECKPOINT_SECONDS`` old
    (``save_manifest`` or ``finalize_ingest`` write the rest). Runs in the process that holds
    the cache lock (the driver), once per batch, in any order.
    """
    version = library_version()
    for out in result.outcomes:
        cached = plan.existing.get(out.key)
        if out.status == "written":
            plan.ingested += 1
            logger.debug("ingested %s: %s", out.key, out.log)
            if cached is not None:
                plan.dead.add((cached.shard, cached.index))
        elif out.status == "unchanged":  # only sent with the cached row's digest
            # Same bytes under a new stat (touched, copied or moved): keep the row, update it.
            plan.reused.add(out.key)
            logger.debug("reused %s: %s", out.key, out.log)
            row = plan.todo_rows[out.key]
            plan.relabel[(cached.shard, cached.index)] = {
                **label_values(row), "source_path": str(row.path),
                "source_size": out.stat.size, "source_mtime_ns": out.stat.mtime_ns}
        else:
            entry = out.quarantine
            logger.warning("quarantined %s [%s]: %s", out.key, entry.category, entry.message)
            size = None if out.stat is None else out.stat.size
            mtime = None if out.stat is None else out.stat.mtime_ns
            plan.quarantine.append((entry, out.key, size, mtime, version))
            if cached is not None:
                plan.dead.add((cached.shard, cached.index))
    if result.shard is not None:
        plan.manifest.shards.append(result.shard)
        plan.manifest.complete = False
        plan.manifest_unsaved = True
        if time.monotonic() - plan.manifest_saved_at >= CHECKPOINT_SECONDS:
            save_manifest(plan)


def _compact(plan: IngestPlan) -> list[str]:
    """Rewrite shards holding dead or relabelled rows; return the replaced file names.

    Streams row group by row group (one row each), so memory holds one volume at a time.
    """
    layout, manifest = plan.layout, plan.manifest
    affected = {name for name, _ in plan.dead} | {name for name, _ in plan.relabel}
    replaced = []
    for pos in reversed(range(len(manifest.shards))):
        info = manifest.shards[pos]
        if info.name not in affected:
            continue
        pf = open_shard(layout.shard_path(info.name))
        with ShardWriter(layout.shard_dir, manifest.take_seq()) as writer:
            for i in range(pf.metadata.num_row_groups):
                if (info.name, i) in plan.dead:
                    continue
                part = pf.read_row_group(i)
                update = plan.relabel.get((info.name, i))
                if update:
                    (row,) = part.to_pylist()
                    part = rows_to_table([{**row, **update}])
                writer.write(part)
            new = writer.commit()
        if new is None:
            del manifest.shards[pos]
        else:
            manifest.shards[pos] = new
        replaced.append(info.name)
    manifest.shards.sort(key=lambda s: s.seq)
    return replaced


def _write_quarantine(layout: CacheLayout, records: list[QuarantineRecord], *,
                      sync_dir: bool = True) -> bool:
    """Atomically replace quarantine.parquet when its content changed; True when written.

    ``sync_dir=False``: the folder is not fsynced (the caller fsyncs it next).
    """
    table = quarantine_table(records)
    if layout.quarantine_path.exists():
        try:
            if pq.read_table(layout.quarantine_path).equals(table):
                return False
        except (OSError, pa.ArrowException):
            pass  # unreadable: rewrite it
    atomic_write_bytes(layout.quarantine_path, parquet_bytes(table), sync_dir=sync_dir)
    return True


def finalize_ingest(plan: IngestPlan, *, seconds: float = 0.0) -> IngestSummary:
    """Compact superseded rows away, write the quarantine table, mark the manifest complete.

    The quarantine table goes first, so that one fsync of the cache folder (the manifest's)
    makes both renames durable; when the manifest is unchanged, the quarantine write syncs
    the folder itself.
    """
    replaced = _compact(plan)
    manifest_missing = not plan.layout.manifest_path.exists()
    write = replaced or plan.manifest_dirty or not plan.manifest.complete or manifest_missing
    _write_quarantine(plan.layout, plan.quarantine, sync_dir=not write)
    if write:
        plan.manifest.complete = True
        save_manifest(plan)
    for name in replaced:
        plan.layout.shard_path(name).unlink(missing_ok=True)
    counts = Counter(entry.category for entry, *_ in plan.quarantine)
    quarantined = {c: counts.get(c, 0) for c in QUARANTINE_CATEGORIES}
    n_bad = sum(quarantined.values())
    return IngestSummary(
        cache_path=str(plan.layout.folder), preproc_digest=plan.layout.digest,
        total=plan.total, ingested=plan.ingested, reused=len(plan.reused),
        relabelled=len(plan.relabel), removed=plan.removed,
        rebuilt_shards=plan.rebuilt_shards, quarantined=quarantined,
        failed_fraction=n_bad / plan.total if plan.total else 0.0, seconds=seconds)


def execute_plan(plan: IngestPlan, *, engine: str = "local", workers: int = 1,
                 progress: Progress | None = None) -> None:
    """Run the plan's batches on ``engine`` and commit each as it completes.

    On any exception (KeyboardInterrupt included) the manifest is written with the shards
    committed so far before the exception propagates, so that a rerun reuses them.
    """
    done, todo = 0, plan.n_todo
    try:
        for result in run_batches(plan.batches, engine=engine, workers=workers):
            commit_batch(plan, result)
            done += len(result.outcomes)
            if progress is not None:
                progress(done, todo)
    except BaseException:
        if plan.manifest_unsaved:
            try:
                save_manifest(plan)
            except Exception:  # keep the original error; the shards are strays next time
                logger.warning("could not record the committed shards in the manifest",
                               exc_info=True)
        raise


def ingest_cohort(cohort: Cohort, cache_dir: str | Path, config: PreprocessConfig, *,
                  engine: str = "local", workers: int = 1, batch_size: int | None = None,
                  progress: Progress | None = None, prune: bool = True,
                  preprocess: Preprocess | None = None) -> IngestSummary:
    """Validate, preprocess and cache every subject-session of ``cohort``.

    Incremental: unchanged subjects are reused from their stat alone, new or changed ones are
    processed, and subjects that fail land in the quarantine table with a category. Results
    are identical for every engine and number of workers.

    Args:
        cohort: parsed cohort (rankcore.mri.read_cohort).
        cache_dir: cache root; this config fills ``cache_dir/<config.digest()>``.
        config: preprocessing config.
        engine: "local" (process pool; in-process when ``workers == 1``) or "ray" (Ray tasks;
            a local Ray instance with ``workers`` CPUs is started when none is running).
        workers: parallel processes / Ray CPUs.
        batch_size: subjects per batch = per shard = per retry; None: up to 64
            (``rankcore.cache.plan.DEFAULT_BATCH_SIZE``), fewer when that gives each of
            ``workers`` a batch.
        progress: ``progress(done, to_process)`` after each committed batch.
        prune: drop cached rows of subject-sessions that are no longer in the cohort.
        preprocess: replaces rankcore.mri.preprocess.preprocess_file (picklable).

    Returns:
        IngestSummary.

    Raises:
        InputError: bad arguments, or another ingest holds the cache.
    """
    check_engine(engine)
    check_workers(workers)
    t0 = time.perf_counter()
    layout = CacheLayout.for_config(cache_dir, config)
    with cache_lock(layout):
        plan = plan_ingest(cohort, cache_dir, config, batch_size=batch_size, prune=prune,
                           preprocess=preprocess, workers=workers)
        execute_plan(plan, engine=engine, workers=workers, progress=progress)
        summary = finalize_ingest(plan, seconds=time.perf_counter() - t0)
    logger.info("ingest summary: %s", summary.to_text().replace("\n", "; "))
    return summary
