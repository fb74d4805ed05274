"""Pydantic models of `brainrank submit` (Ray job submission) and `brainrank serve`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from flows.params_stages import _Params

JobCommand = Literal["pipeline", "simulate", "ingest", "pretrain-sorter", "train", "evaluate",
                     "predict"]


class SubmitParams(_Params):
    """`brainrank submit`: run a brainrank command (the pipeline by default) as a Ray job.

    ``address``: the cluster's job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS,
    or $RAY_ADDRESS when it is an http address). ``stage`` is the command the job runs.
    ``job_config`` (option --config) is that command's own --config file and ``job_args`` its
    options (a list, or one string split like a shell would); both are merged and validated by
    the command's model before submission. ``working_dir`` is uploaded as the
    job's code (a brainrank source folder; default "."); ``pip`` and ``env`` (KEY=VALUE, e.g.
    PREFECT_API_URL) extend the job's runtime environment. ``wait`` streams the job's logs
    until it ends (``timeout`` s at most) and exits non-zero unless it SUCCEEDED.
    ``num_cpus`` / ``num_gpus`` reserve resources for the job's driver. ``token_file``: the
    cluster's token when it runs with RAY_AUTH_MODE=token (see flows/submit.py). ``python``:
    the interpreter that runs the job on the cluster (default: `python` on the nodes' PATH).
    """

    address: str | None = Field(None, description="the cluster's job server, http://HEAD:8265 "
                                                  "(default: $RAY_API_SERVER_ADDRESS)")
    stage: JobCommand = Field("pipeline", description="the brainrank command the job runs")
    job_config: str | None = Field(None, description="the job command's --config file "
                                                     "(validated here, sent with the job)")
    job_args: list[str] = Field(default_factory=list,
                                description='the job command\'s options as one string, e.g. '
                                            '"--out RUN_DIR"')
    working_dir: str = Field(".", description="brainrank source folder uploaded as the job's "
                                              "code")
    pip: list[str] = Field(default_factory=list, description="pip requirement to add to the "
                                                             "job's environment (repeatable)")
    env: dict[str, str] = Field(default_factory=dict,
                                description="environment variable of the job, e.g. "
                                            "PREFECT_API_URL (repeatable)")
    wait: bool = Field(False, description="stream the job's logs until it ends; exit 0 only if "
                                          "it SUCCEEDED")
    timeout: float | None = Field(None, gt=0, description="stop waiting after this many "
                                                          "seconds")
    submission_id: str | None = Field(None, description="the job's id (default: Ray picks "
                                                        "one)")
    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved for the driver")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved for the driver")
    token_file: str | None = Field(None, description="the cluster's auth token (RAY_AUTH_MODE="
                                                     "token clusters; default $RAY_AUTH_TOKEN, "
                                                     "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    python: str = Field("python", min_length=1, description="the Python that runs the job on "
                                                            "the cluster")

    @field_validator("job_args", mode="before")
    @classmethod
    def _shell_words(cls, v: object) -> object:
        if isinstance(v, str):
            import shlex

            try:
                return shlex.split(v)
            except ValueError as exc:
                raise ValueError(f"must be options as a shell would split them ({exc})"
                                 ) from None
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _key_value_pairs(cls, v: object) -> object:
        if isinstance(v, list | tuple):
            bad = [item for item in v if not isinstance(item, str) or "=" not in item
                   or item.startswith("=")]
            if bad:
                raise ValueError(f"must be KEY=VALUE pairs, got {bad[0]!r}")
            return dict(item.split("=", 1) for item in v)
        return v


class ServeParams(_Params):
    """`brainrank serve`: serve the project's deployments with ``prefect.serve``.

    The same deployments as deployments/prefect.yaml (a weekly pipeline run that retrains and
    evaluates when the data changed, a nightly ingest of new subjects, ad hoc runs of the
    pipeline and of every stage flow), with every path under ``root`` and ``cohort`` as the
    cohort (default: none, the pipeline simulates one). ``only``: deployment names to serve
    (default all); ``limit``: flow runs at a time. Needs a Prefect server (PREFECT_API_URL)
    for the schedules to fire; runs until interrupted.
    """

    root: str = Field("runs/scheduled", min_length=1,
                      description="folder of every deployment's outputs")
    cohort: str | None = Field(None, description="cohort of the scheduled runs (default: a "
                                                 "simulated one)")
    only: list[str] = Field(default_factory=list, description="serve only these deployments "
                                                              "(e.g. pipeline/weekly)")
    limit: int | None = Field(None, ge=1, description="flow runs at a time")
