"""`brainrank submit`: run the pipeline (or one stage) as a Ray job on a running Ray cluster.

    brainrank submit --address http://HEAD:8265 [--config FILE] [--job-args "OPTIONS"] [--wait]
    brainrank submit train --address http://HEAD:8265 --job-args "CACHE --out MODEL --engine ray"

The command's parameters (its --config FILE merged with the OPTIONS of --job-args) are
validated HERE, with the command's own pydantic model, so a typo fails before anything is
uploaded; they travel as JSON in the job's environment and ``python -m flows.job COMMAND``
runs the command on the cluster, from the uploaded working directory (``--working-dir``,
default the current folder; .gitignore'd files, .git, .venv and runs/ are left out). Ray sets
RAY_ADDRESS for the job, so every Ray engine of the command joins that cluster. The cluster's
Python must have brainrank's dependencies (``--pip`` adds packages to the job's environment).

Token authentication: a cluster started with RAY_AUTH_MODE=token (the default of a new local
``ray.init()`` / ``ray start`` in Ray 2.60) refuses requests without its token. The token is
sent as an ``Authorization: Bearer`` header, read from ``--token-file``, else $RAY_AUTH_TOKEN,
else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (copy it from the head node, where
``ray get-auth-token`` prints it). With RAY_AUTH_MODE=token set and no token found, submit
stops with a message saying so. A cluster started with RAY_AUTH_MODE=disabled needs none.

This module imports neither rankcore's numerics nor Prefect: only pydantic, the parameter
models and, when submitting, ``ray.job_submission``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from flows.job import PARAMS_ENV
from flows.params import SubmitParams
from rankcore.errors import InputError

#: Left out of the uploaded working directory (on top of its .gitignore).
EXCLUDES = [".git", ".venv", "runs", ".hypothesis", ".pytest_cache", ".ruff_cache",
            "*.egg-info", "__pycache__"]
#: Exit code when --wait stopped waiting after --timeout (the job goes on).
EXIT_TIMEOUT = 124
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """The job server's address: ``address``, $RAY_API_SERVER_ADDRESS, or an http $RAY_ADDRESS."""
    candidates = [address] if address else [os.environ.get("RAY_API_SERVER_ADDRESS"),
                                            os.environ.get("RAY_ADDRESS")]
    for value in candidates:
        if value and value.startswith(("http://", "https://")):
            return value.rstrip("/")
    given = next((v for v in candidates if v), None)
    raise InputError(f"`address` must be the http(s) address of the cluster's job server "
                     f"(http://HEAD:8265), got {given!r}")


def _token_from_env(token_file: str | None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
    elif os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
    else:
        path = Path.home() / ".ray" / "auth_token"
        if not path.is_file():
            return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"`token_file` must be a readable file holding the cluster's token, "
                         f"got {str(path)!r} ({exc.strerror})") from None
    if not token:
        raise InputError(f"`token_file` {str(path)!r} is empty")
    return token


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """HTTP headers authenticating to a token-protected cluster ({} when none is needed).

    A token is sent when ``token_file`` is given or RAY_AUTH_MODE is ``token``, taken from
    the places listed in the module docstring.

    Raises:
        InputError: RAY_AUTH_MODE=token and no token anywhere, or an unreadable token file.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if not token_file and mode != "token":
        return {}
    token = _token_from_env(token_file)
    if token is None:
        raise InputError("RAY_AUTH_MODE=token but no token found: give --token-file, or set "
                         "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the head node's "
                         "~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
    return {"Authorization": f"Bearer {token}"}


def job_parameters(command: str, config: str | None, args: list[str]) -> dict[str, Any]:
    """The validated parameters (JSON-able) of ``brainrank COMMAND [args] --config config``.

    Raises:
        InputError: unknown options or invalid values (the message names them).
    """
    from flows import _config, params
    from flows.cli import COMMANDS, build_parser, given_options

    if command not in COMMANDS:
        raise InputError(f"`command` must be one of {', '.join(COMMANDS)}, got {command!r}")
    try:
        ns = build_parser().parse_args([command, *args])
    except SystemExit:
        raise InputError(f"`job_args` must be options of `brainrank {command}`, got "
                         f"{' '.join(args)!r} (see above)") from None
    given = given_options(ns)
    model = getattr(params, COMMANDS[command][1])
    return _config.build_params(model, given, config).model_dump(mode="json")


#: Parameters naming files or folders the job reads or writes.
PATH_KEYS = ("out", "out_dir", "cohort", "cache", "model_dir", "sorter", "bias_file",
             "storage_path")


def check_cluster_paths(job_params: dict[str, Any]) -> None:
    """Refuse relative paths: a job runs in a temporary copy of the working directory, so a
    relative ``out`` would vanish with it. Paths must be absolute (shared storage).

    Raises:
        InputError: naming the first relative path.
    """
    for key in PATH_KEYS:
        value = job_params.get(key)
        if key == "sorter" and value is not None and "/" not in value:
            continue  # a shipped sorter's name
        if isinstance(value, str) and not value.startswith("/") and "://" not in value:
            raise InputError(f"`{key}` must be an absolute path (on storage the cluster's nodes "
                             f"share) when submitting a job, got {value!r}")


def runtime_env(params: SubmitParams, job_params: dict[str, Any]) -> dict[str, Any]:
    """The job's runtime environment: working_dir, excludes, env_vars (and pip)."""
    working_dir = Path(params.working_dir).expanduser().absolute()
    if not (working_dir / "flows" / "job.py").is_file():
        raise InputError(f"`working_dir` must be a brainrank source folder (with flows/job.py), "
                         f"got {str(working_dir)!r}")
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", **params.env,
           PARAMS_ENV: json.dumps(job_params, sort_keys=True)}
    out: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
                           "env_vars": env}
    if params.pip:
        out["pip"] = list(params.pip)
    return out


async def _tail(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _follow(client: Any, job_id: str, timeout: float | None, out: TextIO) -> str:
    """Stream the job's logs until it ends (or ``timeout`` s); return its last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        asyncio.run(asyncio.wait_for(_tail(client, job_id, out), timeout))
    except TimeoutError:
        return str(client.get_job_status(job_id).value)
    except (RuntimeError, OSError) as exc:  # no websocket through a proxy: poll instead
        print(f"(log streaming unavailable: {exc}; polling the job's status)", file=out)
    while True:  # the log stream can close a moment before the status turns terminal
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def submit(params: SubmitParams, out: TextIO = sys.stdout) -> int:
    """Submit the job; with ``params.wait`` stream its logs and wait for it.

    Returns:
        0 when submitted (no wait) or SUCCEEDED; 1 when it FAILED or was STOPPED;
        :data:`EXIT_TIMEOUT` when ``params.timeout`` passed first (the job goes on).
    """
    address = resolve_address(params.address)
    job_params = job_parameters(params.stage, params.job_config, list(params.job_args))
    check_cluster_paths(job_params)
    env = runtime_env(params, job_params)
    headers = auth_headers(params.token_file)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=headers or None)
    except ConnectionError as exc:
        raise InputError(f"`address` {address!r}: no Ray job server answers there ({exc})"
                         ) from None
    job_id = client.submit_job(
        entrypoint=f"{shlex.quote(params.python)} -m flows.job {params.stage}",
        runtime_env=env,
        submission_id=params.submission_id, entrypoint_num_cpus=params.num_cpus,
        entrypoint_num_gpus=params.num_gpus,
        metadata={"brainrank_command": params.stage})
    print(f"submitted Ray job {job_id} (brainrank {params.stage}) to {address}", file=out)
    if not params.wait:
        print(f"follow it: ray job logs --address {address} --follow {job_id}; status: "
              f"ray job status --address {address} {job_id}", file=out)
        return 0
    status = _follow(client, job_id, params.timeout, out)
    print(f"Ray job {job_id}: {status}", file=out)
    if status == "SUCCEEDED":
        return 0
    if status in _TERMINAL:
        return 1
    print(f"stopped waiting after {params.timeout:g} s; the job goes on (ray job stop "
          f"--address {address} {job_id} stops it)", file=out)
    return EXIT_TIMEOUT


def run_cli(params: SubmitParams) -> int:
    try:
        return submit(params)
    except InputError as exc:
        print(f"brainrank submit: error: {exc}", file=sys.stderr)
        return 2
