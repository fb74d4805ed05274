"""Forward rankcore's log records (per-subject lines, per-epoch lines) to a Prefect run logger."""

from __future__ import annotations

import contextlib
import logging
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
