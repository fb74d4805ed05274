"""Where a pipeline run keeps things (RUN_DIR layout) and what it did (RUN_DIR/pipeline.json).

RUN_DIR::

    cohort/              the simulated cohort (only without --cohort)
    cohort-split.csv     the cohort as a manifest with a held-out test split (only when the
                         cohort names no test rows)
    cache/               the Parquet feature cache (one folder per preprocessing config)
    sorter.safetensors   the pretrained sorter (only with sorter source "pretrain")
    model/               the cascade (weights, card, curves)
    report/              metrics.json, predictions.csv, plots, report.md, report.html
    previous/            the last outputs a rerun replaced (model, sorter, ...), one generation
    pipeline.json        this file: per stage its status, input and output digests, seconds,
                         outputs and summary; the run's paths, headline metrics and any error.
                         A stage the run did not get to (``until``, or a failure before it)
                         keeps its last record, marked ``"carried": true``.

A stage's *input digest* covers its options (not the execution-only ones such as workers)
and the output digests of the stages it reads; a stage whose input digest and outputs are
unchanged since the last run is reused without running it, and a changed stage changes the
input digests of the stages after it, so they run again too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankcore._sealed import CHECKSUM_KEY, checksum, read_sealed
from rankcore.errors import InputError

RUN_FILE = "pipeline.json"
RUN_FORMAT = "brainrank-pipeline/1"
STAGES = ("simulate", "ingest", "sorter", "train", "evaluate")


def digest(*parts: Any) -> str:
    """sha256 of the JSON form of ``parts`` (keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one pipeline run (see the module docstring)."""

    run_dir: Path

    @property
    def cohort(self) -> Path:
        return self.run_dir / "cohort"

    @property
    def manifest(self) -> Path:
        return self.run_dir / "cohort-split.csv"

    @property
    def cache(self) -> Path:
        return self.run_dir / "cache"

    @property
    def sorter(self) -> Path:
        return self.run_dir / "sorter.safetensors"

    @property
    def model(self) -> Path:
        return self.run_dir / "model"

    @property
    def report(self) -> Path:
        return self.run_dir / "report"

    @property
    def state_file(self) -> Path:
        return self.run_dir / RUN_FILE

    @property
    def probe(self) -> Path:
        """A path that never exists (for planning a run without writing it)."""
        return self.run_dir / ".probe-model"

    @classmethod
    def check(cls, run_dir: str | os.PathLike) -> RunLayout:
        """The layout of ``run_dir`` (nothing created); InputError for a folder holding
        anything but an earlier pipeline run."""
        root = Path(run_dir).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise InputError(f"`out` must be a folder, got the file {str(root)!r}")
        if root.is_dir() and any(root.iterdir()) and not (root / RUN_FILE).is_file():
            raise InputError(f"`out` must be an empty folder or an earlier pipeline run (with "
                             f"{RUN_FILE}), got {str(root)!r}: choose another folder")
        return cls(root)

    @classmethod
    def create(cls, run_dir: str | os.PathLike) -> RunLayout:
        """:meth:`check`, then create the folder."""
        layout = cls.check(run_dir)
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        return layout

    def retire(self, path: Path) -> Path | None:
        """Move ``path`` to RUN_DIR/previous/ (replacing what was there); return where."""
        if not path.exists():
            return None
        dest = self.run_dir / "previous" / path.name
        dest.parent.mkdir(exist_ok=True)
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(path, dest)
        return dest


class RunState:
    """The content of pipeline.json: read at the start of a run, rewritten after each stage."""

    def __init__(self, layout: RunLayout, params: dict[str, Any]):
        self.layout = layout
        self._before: dict[str, Any] = {}
        # A run killed while saving leaves its temporary file; this run holds the folder's
        # lock, so no other writer owns one.
        for stray in layout.run_dir.glob(f".{RUN_FILE}.tmp*"):
            stray.unlink(missing_ok=True)
        #: Why the last run's record was not used (a corrupt pipeline.json), or None.
        self.problem = run_state_problem(layout.run_dir)
        old = read_run_state(layout.run_dir) or {}
        if old.get("format") == RUN_FORMAT:
            self._before = old.get("stages", {})
        self._this_run: dict[str, Any] = {}
        self.data: dict[str, Any] = {
            "format": RUN_FORMAT, "run_dir": str(layout.run_dir), "status": "running",
            "started": _now(), "finished": None, "seconds": None, "params": params,
            "stages": {}, "paths": {}, "headline": None, "error": None}
        self.save()

    @property
    def ran_now(self) -> dict[str, Any]:
        """The records of the stages this run got to (the others are carried over)."""
        return dict(self._this_run)

    def previous(self, stage: str) -> dict[str, Any] | None:
        """The record of ``stage`` from the last run (completed stages only), or None."""
        rec = self._before.get(stage)
        return rec if isinstance(rec, dict) and rec.get("status") in (
            "ran", "reused", "skipped") else None

    def matches(self, stage: str, input_digest: str) -> dict[str, Any] | None:
        """The last run's record of ``stage`` when it had this input digest, else None."""
        rec = self.previous(stage)
        return rec if rec is not None and rec.get("input_digest") == input_digest else None

    def record(self, stage: str, status: str, *, input_digest: str, output_digest: str | None,
               seconds: float, outputs: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record a finished stage (status "ran", "reused" or "skipped") and save."""
        rec = {"status": status, "input_digest": input_digest, "output_digest": output_digest,
               "seconds": round(seconds, 2), "outputs": outputs or {},
               "summary": summary or {}, "finished": _now()}
        self._this_run[stage] = rec
        self.save()
        return rec

    def fail(self, stage: str | None, exc: BaseException, kind: str = "error") -> None:
        """Record the failure of ``stage`` and save."""
        self.data.update(status="failed", finished=_now(), error={
            "stage": stage, "kind": kind, "type": type(exc).__name__, "message": str(exc)})
        self.save()

    def finish(self, seconds: float, headline: dict[str, Any] | None) -> dict[str, Any]:
        self.data.update(status="succeeded", finished=_now(), seconds=round(seconds, 2),
                         headline=headline)
        self.save()
        return self.data

    def save(self) -> None:
        # Stages this run did not get to keep their last record (marked "carried"): a later
        # run reuses them only if their input digest matches and their outputs still exist.
        stages = {}
        for name in STAGES:
            rec = self._this_run.get(name)
            if rec is None and self.previous(name) is not None:
                rec = {**self._before[name], "carried": True}
            if rec is not None:
                stages[name] = rec
        self.data["stages"] = stages
        self.data["paths"] = {k: v for rec in stages.values()
                              for k, v in rec.get("outputs", {}).items() if isinstance(v, str)}
        self.data.pop(CHECKSUM_KEY, None)
        self.data[CHECKSUM_KEY] = checksum(self.data)
        _write_json(self.layout.state_file, self.data)


def read_run_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The content of RUN_DIR/pipeline.json, or None when there is none (or it is unreadable
    or corrupt: :func:`run_state_problem` says why)."""
    try:
        return read_sealed(Path(run_dir) / RUN_FILE, RUN_FILE)
    except (OSError, InputError):
        return None


def run_state_problem(run_dir: str | os.PathLike) -> str | None:
    """Why RUN_DIR/pipeline.json cannot be used (one line), or None (fine, or no file yet).

    A corrupt record costs no results: every stage is then checked against its own outputs
    (the cache's checksums, the model card), and reused where they still match.
    """
    path = Path(run_dir) / RUN_FILE
    try:
        read_sealed(path, f"{str(path)!r}")
    except FileNotFoundError:
        return None
    except (OSError, InputError) as exc:
        return f"{exc}; its record is ignored and every stage is checked again"
    return None
