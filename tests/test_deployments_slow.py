"""The deployments for real, in subprocesses (marked slow; they run in CI):

- a `prefect server start` on 127.0.0.1 with its own PREFECT_HOME; `prefect deploy` of
  deployments/prefect.yaml; a process worker; `prefect deployment run pipeline/adhoc --watch`
  of the tiny configuration; the run's files;
- `brainrank serve` of two deployments, one of them run through the API;
- a `ray start --head --block` on 127.0.0.1 (token auth off) with its own ports and temp dir;
  `brainrank submit --wait` of the tiny pipeline on a manifest with a `split` column, whose
  ingest runs as Ray tasks on that cluster and whose flow runs report to the Prefect server
  above; SUCCEEDED and the outputs.

Every server, worker and Ray head is started in its own process group and stopped (always, in
a finally) by signalling that group only: `ray stop` would also kill the session's in-process
Ray cluster (fixture ``ray_cluster``), which may be alive in the same pytest session.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from _tiny_pipeline import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float,
               accept: Callable[[bytes], bool] = lambda body: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and accept(r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the leader (`ray start --block`, the Prefect server and worker stop their
    children), then SIGKILL whatever is left of its process group."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def _service(args: list[str], env: dict[str, str], log: Path, url: str,
             timeout: float = 150.0, accept: Callable[[bytes], bool] = lambda body: True
             ) -> Iterator[subprocess.Popen]:
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    try:
        t0 = time.monotonic()
        _wait_http(url, proc, log, timeout, accept)
        print(f"{Path(args[0]).name} {args[1]} ready in {time.monotonic() - t0:.1f} s")
        yield proc
    finally:
        t0 = time.monotonic()
        _stop_group(proc)
        print(f"{Path(args[0]).name} {args[1]} stopped in {time.monotonic() - t0:.1f} s")


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    print(f"{' '.join(Path(a).name for a in args[:3])}: {time.monotonic() - t0:.1f} s")
    assert out.returncode == 0, f"{args[:4]}: {out.returncode}\n{out.stdout[-4000:]}\n" \
                                f"{out.stderr[-4000:]}"
    return out


def _api(method: str, url: str, body: dict | None = None, tries: int = 6) -> bytes:
    """One call to the Prefect REST API, retried on 503 (SQLite busy on a loaded machine)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(request, timeout=20) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _delete_deployments(api: str) -> None:
    """Delete every deployment of the server (so the next test deploys its own)."""
    for d in json.loads(_api("POST", f"{api}/deployments/filter", {})):
        _api("DELETE", f"{api}/deployments/{d['id']}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server (subprocess) with its own PREFECT_HOME; yields the client env."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_CLI_PROMPT": "false"}
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
            str(port), "--no-ui"]
    with _service(args, env, home / "server.log", f"http://127.0.0.1:{port}/api/health"):
        yield env


def test_prefect_yaml_deploys_and_a_process_worker_runs_the_pipeline(prefect_api, tmp_path):
    env, prefect = prefect_api, str(BIN / "prefect")
    run_dir = tmp_path / "run"
    # The worker creates the process work pool (with its job template); deploy once it exists.
    worker = [prefect, "worker", "start", "--pool", "brainrank", "--type", "process",
              "--limit", "1"]
    with _service(worker, env, tmp_path / "worker.log",
                  f"{env['PREFECT_API_URL']}/work_pools/brainrank"):
        try:
            out = _run([prefect, "deploy", "--all", "--prefect-file",
                        "deployments/prefect.yaml"], env, 240)
            assert "pipeline/weekly" in out.stdout and "predict/adhoc" in out.stdout
            # the deployment's cohort (/data/cohort) is kept unless overridden: null simulates
            params = json.dumps({**TINY, "out": str(run_dir), "cohort": None})
            out = _run([prefect, "deployment", "run", "pipeline/adhoc", "--params", params,
                        "--watch", "--watch-timeout", "300"], env, 360)
        finally:
            _delete_deployments(env["PREFECT_API_URL"])
    assert "Completed" in out.stdout, out.stdout[-3000:]
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["status"] == "succeeded"
    assert {rec["status"] for rec in state["stages"].values()} <= {"ran", "skipped"}
    assert (run_dir / "report" / "report.html").is_file()
    assert (run_dir / "model" / "card.json").is_file()
    assert json.loads((run_dir / "report" / "metrics.json").read_text())["n"] >= 2


def test_brainrank_serve_runs_a_served_deployment(prefect_api, tmp_path):
    env, root = prefect_api, tmp_path / "scheduled"
    serve = [str(BIN / "brainrank"), "serve", "--root", str(root), "--only", "simulate/adhoc",
             "pipeline/weekly"]
    with _service(serve, env, tmp_path / "serve.log",
                  f"{env['PREFECT_API_URL']}/deployments/name/simulate/adhoc"):
        params = json.dumps({"out_dir": str(root / "sim"), "subjects": 2, "spacing": 4.0})
        out = _run([str(BIN / "prefect"), "deployment", "run", "simulate/adhoc", "--params",
                    params, "--watch", "--watch-timeout", "200"], env, 240)
    assert "Completed" in out.stdout, out.stdout[-3000:]
    assert len(list((root / "sim").glob("sub-*/anat/*_T1w.nii*"))) == 2
    weekly = json.loads(_api("GET", f"{env['PREFECT_API_URL']}/deployments/name/pipeline/weekly"))
    assert weekly["parameters"] == {"out": f"{root}/run"}
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 3 * * 0"]


@pytest.fixture
def ray_head(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` on 127.0.0.1, ports and temp dir of its own; yields
    (job server address, env). Stopped by signalling its process group (never `ray stop`)."""
    temp = Path(tempfile.mkdtemp(prefix="brr-", dir="/tmp"))  # unix socket paths stay short
    dashboard = _free_port()
    # PATH as in an activated environment: a job's `python` is the one that runs the cluster
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    args = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
            "--temp-dir", str(temp), "--ray-client-server-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--min-worker-port", "20100", "--max-worker-port", "20999"]
    try:
        with _service(args, env, tmp_path / "ray.log",
                      f"http://127.0.0.1:{dashboard}/api/version"):
            yield f"http://127.0.0.1:{dashboard}", env
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _manifest_with_split(root: Path) -> tuple[Path, int]:
    """A tiny simulated cohort as a manifest whose `split` column marks 3 subjects test."""
    from rankcore.mri.simulate import simulate_cohort

    cohort = simulate_cohort(root / "cohort", subjects=16, seed=5, spacing=4.0, sites=2)
    with open(cohort / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path", "age", "sex", "site", "split"])
        for i, r in enumerate(rows):
            image = next((cohort / r["participant_id"] / "anat").glob("*_T1w.nii*"))
            w.writerow([r["participant_id"], image.relative_to(root), r["age"], r["sex"],
                        r["site"], "test" if i % 5 == 1 else "train"])
    return manifest, sum(i % 5 == 1 for i in range(len(rows)))


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, prefect_api, tmp_path):
    address, env = ray_head
    manifest, n_test = _manifest_with_split(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**TINY, "ingest": {"engine": "ray", "workers": 2}}))
    run_dir = tmp_path / "run"
    out = _run([str(BIN / "brainrank"), "submit", "--address", address, "--config",
                str(config), f"--job-args=--out {run_dir} --cohort {manifest}",
                "--working-dir", str(REPO), "--env",
                f"PREFECT_API_URL={prefect_api['PREFECT_API_URL']}", "--wait",
                "--timeout", "300"], env, 360)
    assert "SUCCEEDED" in out.stdout.splitlines()[-1], out.stdout[-3000:]
    assert f"report: {run_dir / 'report' / 'report.html'}" in out.stdout  # logs streamed
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["status"] == "succeeded"
    ingest = state["stages"]["ingest"]
    assert ingest["summary"]["split_source"] == "cohort"  # the manifest's split is honoured
    assert ingest["outputs"]["cohort_manifest"] == str(manifest)
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["n"] == n_test
