"""The flows as deployments run them: one flat parameter per field of the flow's model.

Prefect merges a run's parameters over its deployment's shallowly, key by key. With the
model's fields as the flow's own parameters, ``prefect deployment run pipeline/weekly
--params '{"spacing": 3.0}'`` changes ``spacing`` and keeps every other parameter of the
deployment (``out``, ``cohort``, ``until``); a pipeline section given in ``--params``
(``{"train": {...}}``) replaces that section, whose missing keys take the model's defaults.

Each flow here has the name of the flow it runs (``pipeline``, ``ingest``, ...), its task
runner, and a signature generated from the model: the server's parameter schema holds each
field's type, bounds, default and description. The body validates the whole model (the
checks between fields) and runs the flow's function in this flow run.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Annotated, Any

from prefect import Flow
from pydantic_core import PydanticUndefined

from flows import params as params_module
from flows.cli import COMMANDS

#: command -> the flow it runs (module:function); the deployments' entry points are
#: ``flows.deployed:<attribute>`` with the attribute in :data:`ATTRIBUTES`.
FLOWS = {
    "pipeline": "flows.pipeline:pipeline_flow",
    "simulate": "flows.simulate:simulate_flow",
    "ingest": "flows.ingest:ingest_flow",
    "pretrain-sorter": "flows.pretrain_sorter:pretrain_sorter_flow",
    "train": "flows.train:train_flow",
    "evaluate": "flows.evaluate:evaluate_flow",
    "predict": "flows.predict:predict_flow",
}
ATTRIBUTES = {command: command.replace("-", "_") for command in FLOWS}


def _signature(model: Any) -> inspect.Signature:
    parameters = []
    for name, info in model.model_fields.items():
        default = inspect.Parameter.empty
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
        bounds = copy.copy(info)  # type, bounds and description; the default is the parameter's
        bounds.default, bounds.default_factory = PydanticUndefined, None
        parameters.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[info.annotation, bounds]))
    return inspect.Signature(parameters)


def flat_flow(command: str) -> Flow:
    """The flow of ``command`` with its model's fields as parameters (see module docstring)."""
    module, attribute = FLOWS[command].split(":")
    base: Flow = getattr(importlib.import_module(module), attribute)
    model = getattr(params_module, COMMANDS[command][1])

    def run(**values: Any) -> Any:
        return base.fn(model.model_validate(values))

    run.__signature__ = _signature(model)  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = ATTRIBUTES[command]
    run.__module__ = __name__
    run.__doc__ = model.__doc__
    return Flow(run, name=base.name, task_runner=base.task_runner, log_prints=base.log_prints,
                description=base.description, validate_parameters=True)


pipeline = flat_flow("pipeline")
simulate = flat_flow("simulate")
ingest = flat_flow("ingest")
pretrain_sorter = flat_flow("pretrain-sorter")
train = flat_flow("train")
evaluate = flat_flow("evaluate")
predict = flat_flow("predict")
