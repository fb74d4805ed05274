"""The `brainrank` command: one subcommand per flow.

Each command's options are generated from its parameters model (flows/params.py, through
flows/_options.py): names, types, defaults and help are written once, in the model. A command
imports its flow module, and with it Prefect, only when it runs. Every option can also come
from --config; ``--print-config`` prints the resolved configuration as YAML and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from rankcore.errors import BrainrankError

#: command name -> (flow module, params model name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "simulate": ("flows.simulate", "SimulateParams", "write a simulated BIDS-style cohort"),
    "ingest": ("flows.ingest", "IngestParams",
               "validate, preprocess and cache a cohort (BIDS root or manifest)"),
    "pretrain-sorter": ("flows.pretrain_sorter", "PretrainSorterParams",
                        "pretrain a learned sorter on synthetic sequences (Ray Train)"),
    "train": ("flows.train", "TrainParams",
              "train the two-stage cascade on a cache (cross-fitted stage 1, then stage 2)"),
    "evaluate": ("flows.evaluate", "EvaluateParams",
                 "score a trained cascade on a split of a cache; write metrics, plots, report"),
    "predict": ("flows.predict", "PredictParams",
                "apply a trained cascade to a cohort (BIDS root or manifest); write a table"),
    "card": ("flows.card", "CardParams",
             "print a model's card: intended use, training population, split, metrics, "
             "versions"),
    "pipeline": ("flows.pipeline", "PipelineParams",
                 "the main job: (simulate) -> ingest -> sorter -> train -> evaluate into "
                 "RUN_DIR, reusing unchanged stages"),
    "submit": ("flows.submit", "SubmitParams",
               "run the pipeline (or one stage) as a job on a Ray cluster"),
    "serve": ("flows.serve", "ServeParams",
              "serve the scheduled and ad hoc Prefect deployments (prefect.serve)"),
}


#: command -> the parameter naming what it writes (locked for the run: one writer at a time).
OUTPUT_FIELDS: dict[str, str] = {
    "simulate": "out_dir", "pretrain-sorter": "out", "train": "out", "evaluate": "out",
    "predict": "out", "pipeline": "out",
}

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("brainrank")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


#: Parsed arguments that steer the command line itself, not a command's parameters (submit's
#: `--config` is its `job_config` parameter: the job command's own config file).
CLI_ONLY = ("command", "config", "verbose", "quiet", "print_config")

EPILOG = ("Every option can also be set in a --config FILE (YAML or JSON; keys as "
          "--print-config prints them, dashes or underscores); options given here win over "
          "the file, the file over the defaults shown.")
PIPELINE_EPILOG = ("The sections simulate, ingest, sorter (with sorter.pretrain), train and "
                   "evaluate hold each stage's options (--train.epochs 5, or `train: {epochs: "
                   "5}` in --config); --train.options KEY=VALUE reaches every TrainConfig key. "
                   "`brainrank pipeline --out RUN_DIR --print-config` prints them all with "
                   "their values. ")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options given on the command line, sections (``train.epochs``) nested."""
    from flows._options import nest

    return nest({k: v for k, v in vars(args).items() if k not in CLI_ONLY})


def _set_verbosity(verbose: bool, quiet: bool) -> None:
    """-v: per-subject DEBUG lines reach the console; -q: warnings only, no progress bars."""
    import logging

    from tasks import _logs

    if quiet:
        from rankcore.progress import set_quiet

        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        set_quiet(True)
    _logs.set_level(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainrank",
        description="Brain-age estimation from T1 MRI with ranking losses. "
                    "Each command runs a Prefect flow.")
    parser.add_argument("--version", action="version", version=f"brainrank {_version()}")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also log one line per subject (ingest, predict)")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="warnings and errors only; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from flows import params
    from flows._options import LAYOUT, add_model_options

    for name, (_, model_name, help_text) in COMMANDS.items():
        epilog = (PIPELINE_EPILOG if name == "pipeline" else "") + EPILOG
        usage = "%(prog)s --out RUN_DIR [options]" if name == "pipeline" else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           usage=usage)
        add_model_options(p, getattr(params, model_name), LAYOUT[name])
        if not any("--config" in a.option_strings for a in p._actions):
            p.add_argument("--config", default=None, metavar="FILE",
                           help="YAML or JSON file whose keys mirror the options")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration (defaults < --config < options) "
                            "as YAML and exit without running")
    return parser


def _prepare_environment() -> None:
    # A temporary Prefect server takes 7-16 s to start on 2 cores; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # The telemetry heartbeat of a temporary server trips "database is locked" under load.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # rankcore's records reach the run logs through Prefect's extra loggers (tasks/_logs.py)
    from tasks._logs import PREFECT_ENV

    for key, value in PREFECT_ENV.items():
        os.environ.setdefault(key, value)


def _resolved_training(run_params: Any) -> str:
    """For `train` and `pipeline`: the full training configuration the parameters resolve to
    (library defaults included), as YAML comments, so the printed text still reads back as a
    config file. Empty for other commands."""
    from flows.params import TrainParams

    train = run_params if isinstance(run_params, TrainParams) else None
    if train is None and hasattr(run_params, "train_params"):
        train = run_params.train_params("CACHE", "MODEL")
    if train is None:
        return ""
    import yaml

    text = yaml.safe_dump(train.train_config(), sort_keys=True)
    return ("# resolved training configuration (library defaults included; any key can be set "
            "through `options`):\n" + "".join(f"#   {line}\n" for line in text.splitlines()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `brainrank` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module_name, model_name, _ = COMMANDS[args.command]
    given = given_options(args)
    try:
        from flows import _config, params

        model = getattr(params, model_name)
        run_params = _config.build_params(model, given, getattr(args, "config", None))
        if args.print_config:
            print(_config.to_yaml(run_params), end="")
            print(_resolved_training(run_params), end="")
            return 0
        _prepare_environment()
        _set_verbosity(args.verbose, args.quiet)
        module = importlib.import_module(module_name)
        from rankcore._lock import run_lock
        from tasks._logs import quiet_own_errors

        quiet_own_errors()
        with contextlib.ExitStack() as stack:
            field = OUTPUT_FIELDS.get(args.command)
            if field is not None:
                stack.enter_context(run_lock(getattr(run_params, field), field))
            return int(module.run_cli(run_params))
    except BrainrankError as exc:
        print(f"brainrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brainrank {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
