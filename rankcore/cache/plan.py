"""Decide what an ingest must do, reading only the cache's metadata and the sources' stat.

A cohort row is *reused* without opening its image when the cache holds a row for the same
key whose source path, byte size and ``st_mtime_ns`` are unchanged (the fast pre-check).
Otherwise it is sent to a batch with the cached row's sha256 as ``expected_digest``: the
worker hashes the file and re-processes it only when the digest differs (a touched or moved
but identical file just gets its stat updated). A subject quarantined by an earlier run is
not retried while its file's stat and the brainrank version are unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.cache.batch import Batch, Preprocess, SubjectTask
from rankcore.cache.layout import CacheLayout, Manifest, read_manifest, remove_strays, write_config
from rankcore.cache.schema import (
    LABEL_COLUMNS,
    QUARANTINE_SCHEMA,
    SOURCE_STAT_COLUMNS,
    label_values,
    library_version,
)
from rankcore.cache.shards import read_shard_metadata, verify_shard
from rankcore.errors import InputError
from rankcore.mri.types import Cohort, CohortRow, PreprocessConfig, QuarantineEntry

logger = logging.getLogger("rankcore.cache.ingest")

#: Subjects per batch (= per shard) when none is asked for: fewer batches mean fewer shards
#: (each one an fsync of the file and of its folder, a footer, a manifest entry, a file to
#: open and check on every later ingest). Memory does not grow with it: a batch streams its
#: rows into its shard one subject at a time.
DEFAULT_BATCH_SIZE = 64

#: A quarantine record: (entry, key, source size, source mtime_ns, brainrank version).
QuarantineRecord = tuple[QuarantineEntry, str | None, int | None, int | None, str]


@dataclass(frozen=True)
class CachedRow:
    """Where a cached subject-session lives and what the cache knows about its source."""

    shard: str
    seq: int
    index: int  # row index inside the shard
    values: dict[str, Any]  # LABEL_COLUMNS + SOURCE_STAT_COLUMNS + source_digest


@dataclass
class IngestPlan:
    """The outcome of planning; mutated as batches commit (see rankcore.cache.ingest)."""

    layout: CacheLayout
    config: PreprocessConfig
    manifest: Manifest
    total: int
    batches: list[Batch]
    existing: dict[str, CachedRow]
    reused: set[str] = field(default_factory=set)
    dead: set[tuple[str, int]] = field(default_factory=set)  # (shard name, row index)
    relabel: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    todo_rows: dict[str, CohortRow] = field(default_factory=dict)
    ingested: int = 0
    rebuilt_shards: int = 0
    removed: int = 0
    manifest_dirty: bool = False
    #: Committed shards not yet in manifest.json, and when it was last written (monotonic).
    manifest_unsaved: bool = False
    manifest_saved_at: float = field(default_factory=time.monotonic)

    @property
    def n_todo(self) -> int:
        """Subject-sessions sent to batches."""
        return sum(len(b.subjects) for b in self.batches)


def _check_batch_size(batch_size: int | None) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"`batch_size` must be an integer >= 1, got {batch_size!r}")
    return batch_size


def default_batch_size(n_todo: int, workers: int = 1) -> int:
    """DEFAULT_BATCH_SIZE, or less so that each of ``workers`` gets a batch when it can."""
    return max(1, min(DEFAULT_BATCH_SIZE, math.ceil(n_todo / max(1, workers))))


def _drop_bad_shards(layout: CacheLayout, manifest: Manifest) -> int:
    """Verify every shard (size + checksum); drop and delete the bad ones; return how many."""
    bad = []
    for info in manifest.shards:
        problem = verify_shard(layout, info, full=True)
        if problem is not None:
            logger.warning("cache shard %s is corrupt (%s): removing it; its %d subject(s) "
                           "will be rebuilt", info.name, problem, info.rows)
            bad.append(info)
    for info in bad:
        manifest.shards.remove(info)
        layout.shard_path(info.name).unlink(missing_ok=True)
    return len(bad)


def _load_existing(plan: IngestPlan) -> None:
    """Index the cached rows by key; a key in several shards keeps its highest-seq row."""
    wanted = ["key", "source_digest", *LABEL_COLUMNS, *SOURCE_STAT_COLUMNS]
    for info in sorted(plan.manifest.shards, key=lambda s: s.seq):
        path = plan.layout.shard_path(info.name)
        try:
            rows = read_shard_metadata(path, wanted).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            logger.warning("cache shard %s is unreadable (%s): removing it", info.name, exc)
            plan.manifest.shards.remove(info)
            path.unlink(missing_ok=True)
            plan.rebuilt_shards += 1
            plan.manifest_dirty = True
            continue
        for i, values in enumerate(rows):
            key = values.pop("key")
            old = plan.existing.get(key)
            if old is not None:  # left by an interrupted ingest: the later shard wins
                plan.dead.add((old.shard, old.index))
            plan.existing[key] = CachedRow(info.name, info.seq, i, values)


def _load_verdicts(layout: CacheLayout) -> dict[str, dict[str, Any]]:
    """Earlier per-file quarantine verdicts by key (empty when there are none or unreadable)."""
    if not layout.quarantine_path.exists():
        return {}
    try:
        table = pq.read_table(layout.quarantine_path)
        if not table.schema.remove_metadata().equals(QUARANTINE_SCHEMA.remove_metadata()):
            return {}
    except (OSError, pa.ArrowException):
        return {}
    return {r["key"]: r for r in table.to_pylist()
            if r["key"] is not None and r["source_size"] is not None}


def _classify(plan: IngestPlan, row: CohortRow, verdict: dict[str, Any] | None,
              version: str) -> SubjectTask | None:
    """Reuse the cached row, reuse an earlier quarantine verdict, or return the work to do."""
    cached = plan.existing.get(row.key)
    try:
        st = os.stat(row.path)
    except OSError:
        st = None  # the batch reports it (missing_file / unreadable)
    stat = None if st is None else {"source_path": str(row.path), "source_size": st.st_size,
                                     "source_mtime_ns": st.st_mtime_ns}
    if cached is not None and stat is not None and all(
            cached.values[k] == v for k, v in stat.items()):
        plan.reused.add(row.key)
        labels = label_values(row)
        if any(cached.values[k] != v for k, v in labels.items()):
            plan.relabel[(cached.shard, cached.index)] = {**labels, **stat}
        return None
    if stat is not None and verdict is not None and verdict["brainrank_version"] == version and (
            verdict["source"], verdict["source_size"], verdict["source_mtime_ns"]) == tuple(
            stat.values()):
        entry = QuarantineEntry(row.participant_id, str(row.path), verdict["category"],
                                verdict["message"])
        plan.quarantine.append((entry, row.key, stat["source_size"], stat["source_mtime_ns"],
                                version))
        if cached is not None:
            plan.dead.add((cached.shard, cached.index))
        return None
    return SubjectTask(row, None if cached is None else cached.values["source_digest"])


def plan_ingest(cohort: Cohort, cache_dir: str | Path, config: PreprocessConfig, *,
                batch_size: int | None = None, prune: bool = True,
                preprocess: Preprocess | None = None, workers: int = 1) -> IngestPlan:
    """Check the cache, compare it with the cohort, and cut the work into batches.

    Call it while holding ``cache_lock`` (it deletes corrupt shards and stray files).

    Args:
        cohort: the parsed cohort; its table-level quarantine is carried into the result.
        cache_dir: the cache root; this config's cache is ``cache_dir/<config.digest()>``.
        config: the preprocessing config.
        batch_size: subjects per batch (= per shard, = per retry); None:
            :func:`default_batch_size` (up to 64, fewer to give each of ``workers`` a batch).
        prune: drop cached rows whose key is no longer in the cohort.
        preprocess: replaces rankcore.mri.preprocess.preprocess_file (must be picklable for
            process and Ray engines).
        workers: the parallel workers that will run the batches (only sizes the default
            batches).
    """
    _check_batch_size(batch_size)
    if not isinstance(config, PreprocessConfig):
        raise InputError(f"`config` must be a PreprocessConfig, got {type(config).__name__}")
    layout = CacheLayout.for_config(cache_dir, config)
    layout.shard_dir.mkdir(parents=True, exist_ok=True)
    write_config(layout, config)
    manifest = read_manifest(layout)
    n_bad = _drop_bad_shards(layout, manifest)
    stray = remove_strays(layout, manifest)
    if stray:
        logger.info("removed %d stray file(s) left by an interrupted ingest", len(stray))
    version = library_version()
    plan = IngestPlan(layout=layout, config=config, manifest=manifest,
                      total=len(cohort.rows) + len(cohort.quarantine), batches=[],
                      existing={}, rebuilt_shards=n_bad, manifest_dirty=n_bad > 0)
    _load_existing(plan)
    for note in getattr(cohort, "notes", ()):
        logger.warning("note: %s", note)
    verdicts = _load_verdicts(layout)
    plan.quarantine.extend((e, None, None, None, version) for e in cohort.quarantine)

    todo: list[SubjectTask] = []
    seen: set[str] = set()
    for row in cohort.rows:
        if row.key in seen:
            entry = QuarantineEntry(row.participant_id, str(row.path), "duplicate_id",
                                    f"{row.key} appears more than once in the cohort table")
            plan.quarantine.append((entry, None, None, None, version))
            continue
        seen.add(row.key)
        task = _classify(plan, row, verdicts.get(row.key), version)
        if task is not None:
            todo.append(task)
            plan.todo_rows[row.key] = row

    if prune:
        for key, cached in plan.existing.items():
            if key not in seen:
                plan.dead.add((cached.shard, cached.index))
                plan.removed += 1
    size = batch_size or default_batch_size(len(todo), workers)
    chunks = [tuple(todo[i:i + size]) for i in range(0, len(todo), size)]
    first = manifest.take_seq(len(chunks)) if chunks else manifest.next_seq
    plan.batches = [Batch(index=i, seq=first + i, shard_dir=str(layout.shard_dir),
                          config=config, subjects=chunk, preprocess=preprocess)
                    for i, chunk in enumerate(chunks)]
    return plan
