"""rankcore's log records reach the run's log on the server through Prefect's extra-loggers
setting (PREFECT_LOGGING_EXTRA_LOGGERS=rankcore), tracebacks included; brainrank's own errors
stay off the console handlers (tasks/_logs.py: OwnErrorFilter)."""

from __future__ import annotations

import logging

import pytest
from prefect import flow

from rankcore.errors import InputError
from tasks import _logs

pytestmark = pytest.mark.prefect


def _server_log(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@flow(name="log-check")
def _logs_something() -> None:
    log = logging.getLogger("rankcore.cache.ingest")
    log.info("an info line of the library")
    try:
        raise RuntimeError("an unexpected failure")
    except RuntimeError:
        log.exception("subject sub-07 failed")


def test_library_records_reach_the_run_log_with_their_traceback(prefect_server):
    state = _logs_something(return_state=True)
    messages = _server_log(state.state_details.flow_run_id)
    assert "an info line of the library" in messages
    failed = next(m for m in messages if m.startswith("subject sub-07 failed"))
    assert "Traceback" in failed and "RuntimeError: an unexpected failure" in failed


def test_own_errors_are_dropped_from_the_console_and_others_kept():
    own = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None,
                            (InputError, InputError("`x` must be 1, got 2"), None))
    other = logging.LogRecord("rankcore.cache", logging.ERROR, __file__, 1, "failed", None,
                              (RuntimeError, RuntimeError("boom"), None))
    f = _logs.OwnErrorFilter()
    assert not f.filter(own) and f.filter(other)
