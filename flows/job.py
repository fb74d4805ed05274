"""Entry point of a brainrank Ray job: ``python -m flows.job COMMAND``.

`brainrank submit` validates the command's parameters on the submitting machine and sends
them as JSON in the environment variable :data:`PARAMS_ENV`; this module, run by Ray on the
cluster (from the uploaded working directory), validates them again with the same pydantic
model and runs the command as `brainrank COMMAND` would. Ray sets RAY_ADDRESS for the job, so
every Ray engine of the command joins the cluster the job runs on.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import get_args

from pydantic import ValidationError

#: Environment variable holding the command's parameters (JSON).
PARAMS_ENV = "BRAINRANK_JOB_PARAMS"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``brainrank COMMAND`` with the parameters of $BRAINRANK_JOB_PARAMS; its exit code."""
    from flows import params as params_module
    from flows._config import format_validation_error
    from flows.cli import COMMANDS, _prepare_environment

    jobs = get_args(params_module.JobCommand)
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in jobs:
        print(f"usage: python -m flows.job {{{','.join(jobs)}}} (parameters in "
              f"${PARAMS_ENV})", file=sys.stderr)
        return 2
    command = args[0]
    module_name, model_name, _ = COMMANDS[command]
    text = os.environ.get(PARAMS_ENV)
    if not text:
        print(f"brainrank job {command}: error: ${PARAMS_ENV} is not set (submit jobs with "
              "`brainrank submit`)", file=sys.stderr)
        return 2
    try:
        params = getattr(params_module, model_name).model_validate_json(text)
    except ValidationError as exc:
        print(f"brainrank job {command}: error: {format_validation_error(exc)}",
              file=sys.stderr)
        return 2
    _prepare_environment()
    print(f"brainrank job {command} on Ray cluster {os.environ.get('RAY_ADDRESS', '(local)')}",
          flush=True)
    return int(importlib.import_module(module_name).run_cli(params))


if __name__ == "__main__":
    raise SystemExit(main())
