"""Hold out a test split in a cohort that names none, and fingerprint a cohort cheaply.

A cohort table may label its rows with a ``split`` column (train / val / test); training never
touches ``test`` rows and evaluation scores them. When no row says ``test``,
:func:`with_test_split` holds out a seeded, stable fraction of the UNLABELLED participants as
``test`` (rows labelled train / val keep their label), and :func:`write_manifest` writes
the result as a manifest that ingest reads like any other (absolute image paths, every table
column kept). :func:`cohort_fingerprint` names a cohort's content by its table values and the
size and modification time of its image files (no image is read), the same evidence the
cache's fast reuse check trusts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from rankcore.errors import InputError
from rankcore.mri.types import Cohort, CohortRow

__all__ = ["MANIFEST_COLUMNS", "cohort_fingerprint", "has_test_split", "held_out_participants",
           "with_test_split", "write_manifest"]

#: Columns of a manifest written by :func:`write_manifest` (then the rows' extra columns).
MANIFEST_COLUMNS = ("participant_id", "session", "path", "age", "sex", "site", "split")
TEST = "test"


def has_test_split(cohort: Cohort) -> bool:
    """True when at least one usable row is labelled ``test``."""
    return any(row.split == TEST for row in cohort.rows)


def _draw(seed: int, participant_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, participant_id)."""
    h = hashlib.sha256(f"brainrank-holdout/{seed}/{participant_id}".encode()).hexdigest()
    return int(h[:15], 16) / 16**15


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not 0.0 < float(fraction) <= 0.5:
        raise InputError(f"`fraction` must be a number in (0, 0.5], got {fraction!r}")
    return float(fraction)


def held_out_participants(participant_ids: Iterable[str], fraction: float, seed: int
                          ) -> frozenset[str]:
    """The participants of ``participant_ids`` that the stable hash holds out as ``test``.

    Each participant draws a number u in [0, 1) from a sha256 of ``seed`` and its id and is
    held out when u < ``fraction``. The draw depends on nothing else, so the split is stable
    as the pool grows (a participant never moves between splits when others are added) and
    reproducible. At least two participants are held out when the pool has four or more
    (those with the smallest u), so that a rank correlation exists. The pipeline (on the
    cohort table) and ``brainrank train`` (on a cache without a ``test`` row) both use it.

    Args:
        participant_ids: the pool (duplicates are ignored).
        fraction: expected share of the pool to hold out, in (0, 0.5].
        seed: seeds the draws.

    Raises:
        InputError: ``fraction`` out of range.
    """
    fraction = _check_fraction(fraction)
    pool = sorted(set(participant_ids))
    u = {pid: _draw(int(seed), pid) for pid in pool}
    held_out = {pid for pid in pool if u[pid] < fraction}
    if len(held_out) < 2 <= len(pool) // 2:
        held_out |= set(sorted(pool, key=u.__getitem__)[:2])
    return frozenset(held_out)


def with_test_split(cohort: Cohort, fraction: float, seed: int) -> Cohort:
    """Label about ``fraction`` of the unlabelled participants ``test``; keep other labels.

    The participants with an age and no label form the pool of
    :func:`held_out_participants`; all unlabelled sessions of a held-out participant follow
    it. Rows without an age stay unlabelled.

    Args:
        cohort: a parsed cohort.
        fraction: expected share of the unlabelled participants to hold out, in (0, 0.5].
        seed: seeds the draws.

    Returns:
        A new cohort (same root, kind and quarantine entries).

    Raises:
        InputError: ``fraction`` out of range.
    """
    _check_fraction(fraction)
    pool = {row.participant_id for row in cohort.rows
            if row.split is None and row.age is not None}
    if not pool:
        return cohort
    held_out = held_out_participants(pool, fraction, seed)
    rows = tuple(replace(row, split=TEST)
                 if row.split is None and row.age is not None and row.participant_id in held_out
                 else row for row in cohort.rows)
    return replace(cohort, rows=rows)


def _age_text(row: CohortRow) -> str:
    if row.age is None:
        return ""
    text = repr(float(row.age))
    return f"{text.removesuffix('.0')}+" if row.age_censored else text


def write_manifest(cohort: Cohort, path: str | os.PathLike) -> Path:
    """Write the usable rows of ``cohort`` as a CSV manifest (atomically); return its path.

    Image paths are written absolute, so the manifest can live anywhere; read it back with
    ``allow_outside_root=True`` (every path already passed the original cohort's check).
    Quarantine entries of the original table are not rows and are not written.
    """
    out = Path(path)
    if out.suffix.lower() != ".csv":
        raise InputError(f"`path` must end in .csv, got {str(out)!r}")
    extra = sorted({k for row in cohort.rows for k in row.extra} - set(MANIFEST_COLUMNS))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([*MANIFEST_COLUMNS, *extra])
            for row in cohort.rows:
                writer.writerow([row.participant_id, row.session or "", str(row.path),
                                 _age_text(row), row.sex or "", row.site or "",
                                 row.split or "", *(row.extra.get(k, "") for k in extra)])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cohort_fingerprint(cohort: Cohort) -> str:
    """sha256 over every row's table values and its image's path, size and mtime, and the
    table-level quarantine entries. Reads no image; a touched file changes it."""
    h = hashlib.sha256(b"brainrank-cohort/1\n")
    for row in cohort.rows:
        try:
            st = os.stat(row.path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
        h.update(json.dumps([row.key, str(row.path), stat, row.age, row.age_censored, row.sex,
                             row.site, row.split, sorted(row.extra.items())]).encode() + b"\n")
    for q in cohort.quarantine:
        h.update(json.dumps(["quarantine", q.participant_id, q.source, q.category]).encode()
                 + b"\n")
    return h.hexdigest()
