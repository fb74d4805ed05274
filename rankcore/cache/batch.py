"""One subject batch: digest, preprocess and write one shard. The unit of work and of retry.

``process_batch`` is a plain, picklable function of one picklable argument, so the same code
runs in-process, in a process pool, as a Ray task or inside a Prefect task. A failure of one
subject becomes a quarantine entry and never aborts the batch; the shard holds the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rankcore.cache.layout import ShardInfo, sha256_file
from rankcore.cache.schema import SourceStat, rows_to_table, volume_row
from rankcore.cache.shard_writer import ShardWriter
from rankcore.errors import QuarantineError
from rankcore.mri.load import read_source
from rankcore.mri.types import CohortRow, PreprocessConfig, PreprocessedVolume, QuarantineEntry

logger = logging.getLogger("rankcore.cache.ingest")

Preprocess = Callable[[Path, PreprocessConfig], PreprocessedVolume]


@dataclass(frozen=True)
class SubjectTask:
    """A subject-session to (re)process; ``expected_digest`` is its cached file's sha256."""

    row: CohortRow
    expected_digest: str | None = None


@dataclass(frozen=True)
class Batch:
    """Subjects processed together and written to one shard (``seq`` orders the shards)."""

    index: int
    seq: int
    shard_dir: str
    config: PreprocessConfig
    subjects: tuple[SubjectTask, ...]
    preprocess: Preprocess | None = None  # None: rankcore.mri.preprocess.preprocess_file


@dataclass(frozen=True)
class SubjectOutcome:
    """What happened to one subject.

    ``status`` is "written" (a new row in this batch's shard), "unchanged" (the file's digest
    equals ``expected_digest``: the cached row stays) or "quarantined" (see ``quarantine``).
    ``log`` is the subject's one-line description.
    """

    key: str
    status: Literal["written", "unchanged", "quarantined"]
    stat: SourceStat | None
    quarantine: QuarantineEntry | None = None
    log: str = ""


@dataclass(frozen=True)
class BatchResult:
    """The shard a batch wrote (None when no subject was written) and every subject's outcome."""

    index: int
    shard: ShardInfo | None
    outcomes: tuple[SubjectOutcome, ...]
    seconds: float


def _quarantined(row: CohortRow, category: str, message: str,
                 stat: SourceStat | None) -> SubjectOutcome:
    entry = QuarantineEntry(row.participant_id, str(row.path), category, message)
    return SubjectOutcome(row.key, "quarantined", stat, entry, f"[{category}] {message}")


def _default_preprocess() -> tuple[Callable[..., PreprocessedVolume],
                                   Callable[[PreprocessedVolume], str]]:
    from rankcore.mri.preprocess import describe, preprocess_file

    return preprocess_file, describe


#: Extra bytes beyond ``max_voxels`` float64 voxels that a source may hold and still be read
#: into memory whole (header, extensions).
_READ_WHOLE_SLACK = 1 << 20


def _read_whole(size: int, config: PreprocessConfig) -> bool:
    """Whether a source of ``size`` bytes is read into memory once (hashed, then decoded)
    rather than hashed as a stream: no larger than the largest image ``config`` accepts, so
    that a huge file is still refused from its header without being read into memory."""
    return size <= config.max_voxels * 8 + _READ_WHOLE_SLACK


def process_subject(task: SubjectTask, config: PreprocessConfig,
                    preprocess: Preprocess | None = None) -> tuple[SubjectOutcome, dict | None]:
    """Digest and preprocess one subject; return its outcome and its cache row (or None).

    With the default preprocessing the file is read once: its bytes are hashed, then
    decoded from memory (the digest is that of the bytes preprocessed). A replacement
    ``preprocess`` (or a file larger than any image ``config`` accepts) is hashed as a stream
    and reads the file itself.
    """
    row = task.row
    default_preprocess, describe = _default_preprocess()
    path = Path(row.path)
    source: list[bytes | None] = [None]  # the only reference to the bytes (see below)
    try:
        st = os.stat(path)
        if preprocess is None and _read_whole(st.st_size, config):
            source[0], st = read_source(path)
            digest = hashlib.sha256(source[0]).hexdigest()
        else:
            digest = sha256_file(path)
        stat = SourceStat(digest, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        return _quarantined(row, "missing_file", f"{row.path} does not exist", None), None
    except OSError as exc:
        return _quarantined(row, "unreadable", f"cannot read {row.path}: {exc}", None), None
    if stat.digest == task.expected_digest:
        return SubjectOutcome(row.key, "unchanged", stat, log="unchanged (same sha256)"), None
    try:
        if preprocess is not None:
            pv = preprocess(path, config)
        else:
            # handed over, not kept here: freed as soon as the voxels are decoded
            pv = default_preprocess(path, config, raw=source.pop())
        record = volume_row(row, pv, config, stat)
    except QuarantineError as exc:
        return _quarantined(row, exc.category, str(exc), stat), None
    except MemoryError:
        return _quarantined(row, "too_large", "ran out of memory while preprocessing", stat), None
    except Exception as exc:  # one subject's failure must not abort its batch
        logger.debug("unexpected error on %s", row.key, exc_info=True)
        return _quarantined(row, "unreadable",
                            f"unexpected {type(exc).__name__} while preprocessing: {exc}",
                            stat), None
    return SubjectOutcome(row.key, "written", stat, log=describe(pv)), record


def process_batch(batch: Batch) -> BatchResult:
    """Process every subject of ``batch``, streaming the successful ones into one shard.

    Memory holds one subject at a time (plus its row while it is written), whatever the
    batch size.
    """
    t0 = time.perf_counter()
    outcomes = []
    with ShardWriter(Path(batch.shard_dir), batch.seq) as writer:
        for task in batch.subjects:
            outcome, record = process_subject(task, batch.config, batch.preprocess)
            outcomes.append(outcome)
            if record is not None:
                writer.write(rows_to_table([record]))
                del record
        shard = writer.commit()
    return BatchResult(batch.index, shard, tuple(outcomes), time.perf_counter() - t0)
