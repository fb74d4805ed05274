"""Where rankcore's log records go, and brainrank's own errors kept to one line on the console.

rankcore's records (per-subject lines, per-epoch lines) reach the Prefect run they happen in
through Prefect's own extra-loggers setting, ``PREFECT_LOGGING_EXTRA_LOGGERS=rankcore`` (read
when Prefect sets up logging: the CLI, `brainrank serve`, the work pool of
deployments/prefect.yaml and the Ray job entry point set it first), with their tracebacks.
Everywhere they also reach the console through the root logger. This module sets the
``rankcore`` logger's level: INFO unless the CLI chose another (``-v`` DEBUG, ``-q`` WARNING).
"""

from __future__ import annotations

import logging
import sys

#: The library's logger; Prefect attaches its API handler to it (the extra-loggers setting).
LIBRARY_LOGGER = "rankcore"

#: The environment that sends rankcore's records to the runs' logs (set before Prefect loads).
PREFECT_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": LIBRARY_LOGGER,
               # a record logged outside any run (library use, a Ray worker) is not an error
               "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}


def set_level(level: int) -> None:
    """Records of ``level`` and up of every rankcore logger reach the console and the runs."""
    logging.getLogger(LIBRARY_LOGGER).setLevel(int(level))


if logging.getLogger(LIBRARY_LOGGER).level == logging.NOTSET:
    set_level(logging.INFO)  # the root logger's WARNING would drop the per-epoch lines


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
