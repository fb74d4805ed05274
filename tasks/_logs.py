"""Forward rankcore's log records (per-subject lines, per-epoch lines) to a Prefect run logger."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

#: Lowest level forwarded: INFO by default, DEBUG with `brainrank -v` (per-subject lines),
#: WARNING with `brainrank -q` (see :func:`set_level`).
_level = logging.INFO


def set_level(level: int) -> None:
    """Forward records of ``level`` and up from now on."""
    global _level
    _level = int(level)


class ToRunLogger(logging.Handler):
    """A logging handler that re-emits records on a Prefect run logger (flow or task).

    DEBUG records (forwarded only at verbosity DEBUG) are re-emitted at INFO, the lowest level
    a run logger prints.
    """

    def __init__(self, target: logging.LoggerAdapter):
        super().__init__(_level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(max(record.levelno, logging.INFO), record.getMessage())


@contextlib.contextmanager
def forward_logs(target: logging.LoggerAdapter, names: Sequence[str]) -> Iterator[None]:
    """Send the records (INFO and up; see :func:`set_level`) of ``names`` to ``target``.

    A logger that already forwards to a run logger (an enclosing ``forward_logs``) is left as
    it is, so nested flows and tasks do not print each line twice.
    """
    handler = ToRunLogger(target)
    saved = []
    for name in names:
        source = logging.getLogger(name)
        if any(isinstance(h, ToRunLogger) for h in source.handlers):
            continue
        saved.append((source, source.level, source.propagate))
        source.addHandler(handler)
        source.setLevel(_level)
        source.propagate = False  # the run logger prints to the console already
    try:
        yield
    finally:
        for source, level, propagate in saved:
            source.removeHandler(handler)
            source.level, source.propagate = level, propagate


class OwnErrorFilter(logging.Filter):
    """Keep brainrank's own errors (``BrainrankError``) to one line on the console.

    Prefect logs an exception raised in a task or flow with its traceback, once per enclosing
    task and flow, and then each run's final state. For a ``BrainrankError`` (unusable input,
    a held lock, a corrupt file: the message already says what to do) those records are
    dropped from the console; the command prints the message itself. The records still reach
    Prefect's API (the UI keeps the traceback): the filter sits on console handlers only.
    """

    def __init__(self) -> None:
        super().__init__("brainrank-own-errors")
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from rankcore.errors import BrainrankError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BrainrankError):
            self.seen.add(str(exc))
            return False
        if record.levelno < logging.INFO or not self.seen:
            return True
        text = record.getMessage()
        # Prefect repeats the message inside a state's repr (quotes may be escaped there).
        return not any(msg and msg[:60] in text for msg in self.seen)


_filter = OwnErrorFilter()


def quiet_own_errors() -> None:
    """Install :class:`OwnErrorFilter` on the root logger's console handlers (idempotent)."""
    for handler in logging.getLogger().handlers:
        console = type(handler).__name__ == "PrefectConsoleHandler" or (
            isinstance(handler, logging.StreamHandler)
            and getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__))
        if console and _filter not in handler.filters:  # not a test's capturing handler
            handler.addFilter(_filter)


quiet_own_errors()  # also in process-pool workers, which import this module with their task
