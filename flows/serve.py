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
  ``prefect deployment run FLOW/adhoc --params '{"params": {...}}'``.

Parameters are the flows' pydantic models as dicts (``{"params": {...}}``), validated here
and, with ``enforce_parameter_schema``, by the server for every run.
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

#: command -> flow entrypoint (module:function).
ENTRYPOINTS = {
    "pipeline": "flows.pipeline:pipeline_flow",
    "simulate": "flows.simulate:simulate_flow",
    "ingest": "flows.ingest:ingest_flow",
    "pretrain-sorter": "flows.pretrain_sorter:pretrain_sorter_flow",
    "train": "flows.train:train_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "predict": "flows.predict:predict_flow",
}


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its name, flow, schedule (cron or None) and ``params`` argument."""

    name: str
    command: str
    cron: str | None
    description: str
    params: dict[str, Any] = field(default_factory=dict)

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
                       "stages.", pipeline),
        DeploymentSpec("nightly-ingest", "pipeline", NIGHTLY,
                       "Nightly ingest of new subjects into the weekly run's cache.",
                       {**pipeline, "until": "ingest"}),
        DeploymentSpec("adhoc", "pipeline", None, "The whole pipeline, on demand.", pipeline),
        DeploymentSpec("adhoc", "simulate", None, "Simulate a cohort.",
                       {"out_dir": f"{root}/simulated"}),
        DeploymentSpec("adhoc", "ingest", None, "Ingest a cohort into the run's cache.",
                       {"cohort": cohort or f"{run}/cohort", "cache": f"{run}/cache"}),
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
    return [_flow(s.command).to_deployment(
                name=s.name, cron=s.cron, parameters={"params": s.params},
                description=s.description, tags=list(TAGS), enforce_parameter_schema=True)
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
