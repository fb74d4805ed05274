"""The project's Prefect deployments, defined once: deployments/prefect.yaml and `brainrank serve`.

Deployments (flow/deployment name; every path under ROOT, the cohort COHORT):

- ``pipeline/weekly`` (Sundays 03:00 UTC): the whole pipeline into ROOT/run. Stages whose
  inputs did not change are reused, so it retrains and re-evaluates exactly when the data (or
  the configuration) changed: the weekly retrain + evaluate.
- ``pipeline/nightly-ingest`` (every night 01:00 UTC): the pipeline up to its ingest stage
  (``until: ingest``) into the same ROOT/run, so new subjects are preprocessed every night
  with the same held-out split, and the weekly run finds them cached.
- ``pipeline/adhoc`` and ``<stage>/adhoc`` for every stage flow (simulate, ingest,
  pretrain-sorter, train, evaluate, predict): no schedule, run on demand with
  ``prefect deployment run FLOW/adhoc --params '{...}'``.

The deployed flows (flows/deployed.py) take the fields of the flow's pydantic model as flat
parameters, so a run's ``--params`` changes the keys it names and keeps the others. They are
validated here and, with ``enforce_parameter_schema``, by the server for every run. The
deployments that write ROOT/run (weekly, nightly-ingest, pipeline/adhoc, ingest/adhoc) run one
flow run at a time each (``concurrency_limit`` 1, later runs wait); across them the run
folder's lock refuses a second writer.
deployments/prefect.yaml holds these specs for ROOT=/data/brainrank, COHORT=/data/cohort
(a test keeps the two equal); `brainrank serve --root DIR --cohort COHORT` (or
``python -m deployments.serve``) serves them with ``prefect.serve`` for users without a work
pool or worker. Either way the schedules need a Prefect server (`prefect server start`).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any

from flows import params as params_module
from flows.cli import COMMANDS
from flows.params import ServeParams
from rankcore.errors import InputError

NIGHTLY = "0 1 * * *"
WEEKLY = "0 3 * * 0"
TIMEZONE = "UTC"
WORK_POOL = "brainrank"
TAGS = ("brainrank",)

#: command -> the deployed flow's entrypoint (module:attribute; flows/deployed.py).
ENTRYPOINTS = {command: f"flows.deployed:{command.replace('-', '_')}" for command in
               ("pipeline", "simulate", "ingest", "pretrain-sorter", "train", "evaluate",
                "predict")}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its name, flow, schedule (cron or None), parameters and concurrency
    limit (flow runs at a time, None: no limit)."""

    name: str
    command: str
    cron: str | None
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None

    @property
    def entrypoint(self) -> str:
        return ENTRYPOINTS[self.command]

    @property
    def flow_name(self) -> str:
        return self.command

    def validate(self) -> Any:
        """The flow's parameter model built from ``params`` (InputError if invalid)."""
        from pydantic import ValidationError

        from flows._config import format_validation_error

        model = getattr(params_module, COMMANDS[self.command][1])
        try:
            return model.model_validate(self.params)
        except ValidationError as exc:
            raise InputError(f"deployment {self.command}/{self.name}: "
                             f"{format_validation_error(exc)}") from None


def deployment_specs(root: str, cohort: str | None = None) -> list[DeploymentSpec]:
    """The deployments with every path under ``root`` (see the module docstring)."""
    root = root.rstrip("/") or "/"
    run = f"{root}/run"
    pipeline: dict[str, Any] = {"out": run}
    if cohort:
        pipeline["cohort"] = cohort
    specs = [
        DeploymentSpec("weekly", "pipeline", WEEKLY,
                       "Weekly retrain + evaluate: the whole pipeline, reusing unchanged "
                       "stages.", pipeline, 1),
        DeploymentSpec("nightly-ingest", "pipeline", NIGHTLY,
                       "Nightly ingest of new subjects into the weekly run's cache.",
                       {**pipeline, "until": "ingest"}, 1),
        DeploymentSpec("adhoc", "pipeline", None, "The whole pipeline, on demand.", pipeline,
                       1),
        DeploymentSpec("adhoc", "simulate", None, "Simulate a cohort.",
                       {"out_dir": f"{root}/simulated"}),
        DeploymentSpec("adhoc", "ingest", None, "Ingest a cohort into the run's cache.",
                       {"cohort": cohort or f"{run}/cohort", "cache": f"{run}/cache"}, 1),
        DeploymentSpec("adhoc", "pretrain-sorter", None, "Pretrain a learned sorter.",
                       {"out": f"{root}/adhoc/sorter.safetensors"}),
        DeploymentSpec("adhoc", "train", None, "Train a cascade on the run's cache.",
                       {"cache": f"{run}/cache", "out": f"{root}/adhoc/model"}),
        DeploymentSpec("adhoc", "evaluate", None, "Evaluate the run's cascade.",
                       {"model_dir": f"{run}/model", "cache": f"{run}/cache",
                        "out": f"{root}/adhoc/report"}),
        DeploymentSpec("adhoc", "predict", None, "Predict brain ages of a new cohort.",
                       {"model_dir": f"{run}/model", "cohort": f"{root}/incoming",
                        "out": f"{root}/adhoc/predictions.csv"}),
    ]
    for spec in specs:
        spec.validate()
    return specs


def _flow(command: str) -> Any:
    module, name = ENTRYPOINTS[command].split(":")
    return getattr(importlib.import_module(module), name)


def build_deployments(params: ServeParams) -> list[Any]:
    """RunnerDeployments (``flow.to_deployment``) of the selected specs."""
    specs = deployment_specs(params.root, params.cohort)
    known = {f"{s.command}/{s.name}" for s in specs}
    unknown = sorted(set(params.only) - known)
    if unknown:
        raise InputError(f"`only` must name deployments among {', '.join(sorted(known))}, "
                         f"got {', '.join(unknown)}")
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    def limit(spec: DeploymentSpec) -> ConcurrencyLimitConfig | None:
        if spec.concurrency_limit is None:
            return None
        return ConcurrencyLimitConfig(limit=spec.concurrency_limit, collision_strategy="ENQUEUE")

    return [_flow(s.command).to_deployment(
                name=s.name, cron=s.cron, parameters=s.params, description=s.description,
                tags=list(TAGS), enforce_parameter_schema=True, concurrency_limit=limit(s))
            for s in specs if not params.only or f"{s.command}/{s.name}" in params.only]


def run_cli(params: ServeParams) -> int:
    """Serve the deployments until interrupted (prefect.serve)."""
    from prefect import serve

    from flows._server import temporary_server

    try:
        deployments = build_deployments(params)
    except InputError as exc:
        print(f"brainrank serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {len(deployments)} deployment(s) under {params.root}: "
          + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments))
    with temporary_server():
        serve(*deployments, limit=params.limit)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.serve [options]` = `brainrank serve [options]`."""
    from flows.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
