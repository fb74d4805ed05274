"""The temporary Prefect server of one `brainrank` command, bound to the command's life.

Without an API URL, Prefect starts a temporary server in a child process on the first flow
call and stops it at interpreter exit (``atexit``), which never runs when the command is
killed outright (``kill -9``, the OOM killer): the server (~200 MB) was then left running.
Here the command starts that server itself, the way Prefect does (uvicorn on 127.0.0.1 with
the same ephemeral settings), but as a child that the kernel signals when its parent dies
(``PR_SET_PDEATHSIG``, Linux), and that exits at once when its parent died before
``prctl`` took effect. Flows then use it through ``PREFECT_API_URL``, like any server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from rankcore.errors import BrainrankError

_PR_SET_PDEATHSIG = 1


class ServerStartError(BrainrankError, RuntimeError):
    """The temporary Prefect server did not start."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child (``preexec_fn``): receive ``sig`` when the parent dies; exit if it already did.

    Linux only (``prctl``); elsewhere a no-op (the child then outlives a killed parent).
    """
    parent = int(os.environ.get("BRAINRANK_PARENT_PID", "0"))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def needs_server() -> bool:
    """True when no Prefect API URL is configured (environment, profile or settings)."""
    from prefect.settings import get_current_settings

    return not get_current_settings().api.url


def start_server(timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start a temporary Prefect server bound to this process; return (process, API URL).

    Raises:
        ServerStartError: it did not answer its health check within ``timeout`` seconds.
    """
    from prefect.settings import get_current_settings

    port = _free_port()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "BRAINRANK_PARENT_PID": str(os.getpid())}
    env.pop("PREFECT_API_URL", None)
    import prefect

    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
           "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
            raise ServerStartError(f"the temporary Prefect server exited with code "
                                   f"{proc.returncode}: {err[-1] if err else 'no output'}")
        if _healthy(url):
            return proc, url
        time.sleep(0.2)
    stop_server(proc)
    raise ServerStartError(f"the temporary Prefect server did not answer within {timeout:g} s; "
                           "set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher or "
                           "PREFECT_API_URL to a running server")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server (SIGTERM, then SIGKILL after 10 s) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued to the server before it stops."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """Run a temporary Prefect server while inside, unless an API URL is configured.

    Yields the API URL this process uses (None: a configured server). Sets
    ``PREFECT_API_URL`` in the environment (for child processes) and in Prefect's settings.
    """
    if not needs_server():
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
    proc, url = start_server(timeout)
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        stop_server(proc)
