"""Forward rankcore's log records (per-subject lines, per-epoch lines) to a Prefect run logger."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


class ToRunLogger(logging.Handler):
    """A logging handler that re-emits records on a Prefect run logger (flow or task)."""

    def __init__(self, target: logging.LoggerAdapter):
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def forward_logs(target: logging.LoggerAdapter, names: Sequence[str]) -> Iterator[None]:
    """Send the records (INFO and up) of the ``names`` loggers to ``target`` while inside.

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
        source.setLevel(logging.INFO)
        source.propagate = False  # the run logger prints to the console already
    try:
        yield
    finally:
        for source, level, propagate in saved:
            source.removeHandler(handler)
            source.level, source.propagate = level, propagate
