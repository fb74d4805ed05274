"""Test isolation and the session-scoped resources (Prefect server, Ray cluster).

The environment is set at import time, before any test module imports Prefect or Ray, so
nothing a test does touches the real HOME, PREFECT_HOME or ~/.ray.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="brainrank-tests-"))
for _sub in ("home", "prefect", "cache", "ray"):
    (_SESSION_ROOT / _sub).mkdir()
os.environ["HOME"] = str(_SESSION_ROOT / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_ROOT / "prefect")
os.environ["XDG_CACHE_HOME"] = str(_SESSION_ROOT / "cache")
os.environ["MPLCONFIGDIR"] = str(_SESSION_ROOT / "cache" / "mpl")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# The telemetry heartbeat of a temporary server trips "database is locked" under load.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
# rankcore's records reach the run logs as under the CLI (tasks/_logs.py: PREFECT_ENV)
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "rankcore"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("RAY_ADDRESS", None)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread during the test: tiny models only lose from threading on a
    shared 2-core machine (modules opt in with ``pytest.mark.usefixtures``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def session_root() -> Path:
    """The temporary folder that holds this test session's HOME, PREFECT_HOME and caches."""
    return _SESSION_ROOT


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the whole session (entering costs ~12 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, loopback only) for the whole session; shut down at the
    end. Its workers inherit this process's environment (PYTHONPATH included)."""
    import ray

    from rankcore.cache.engines import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, _temp_dir=str(_SESSION_ROOT / "ray"),
                        configure_logging=False)
    yield ray
    ray.shutdown()
