"""The `brainrank` command: one subcommand per flow.

Parsers are defined here (importing this module stays fast); a command imports its flow
module, and with it Prefect, only when it runs. Every option can also come from --config.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rankcore.errors import BrainrankError

S = argparse.SUPPRESS

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


def _add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", nargs="?", default=S, metavar="OUT_DIR")
    p.add_argument("--subjects", type=int, default=S, help="number of subjects (default 200)")
    p.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    p.add_argument("--spacing", type=float, default=S, help="simulation voxel size, mm (2.0)")
    p.add_argument("--sites", type=int, default=S, help="number of scanner sites (3)")
    p.add_argument("--corrupt", type=int, default=S,
                   help="add this many deliberately broken files (0)")
    p.add_argument("--workers", type=int, default=S, help="processes (1)")
    p.add_argument("--no-anatomy", dest="anatomy", action="store_false", default=S,
                   help="no per-subject anatomical warp: every brain is the template's")
    p.add_argument("--warp-sd-mm", type=float, default=S,
                   help="RMS displacement of the anatomical warp, mm (2.5)")


def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", nargs="?", default=S, metavar="COHORT",
                   help="BIDS root or manifest (.csv, .tsv, .parquet)")
    p.add_argument("--cache", default=S, metavar="CACHE_DIR", help="cache folder")
    p.add_argument("--spacing", type=float, default=S, help="output voxel size, mm (2.0)")
    p.add_argument("--shape", type=int, nargs=3, default=S, metavar=("X", "Y", "Z"),
                   help="output grid in voxels (80 96 80)")
    p.add_argument("--workers", type=int, default=S, help="parallel workers (1)")
    p.add_argument("--engine", choices=["local", "ray"], default=S,
                   help="run subjects in local processes or as Ray tasks (local)")
    p.add_argument("--max-failed-fraction", type=float, default=S,
                   help="exit non-zero when more than this fraction is quarantined (0.5)")
    p.add_argument("--allow-outside-root", action="store_true", default=S,
                   help="accept manifest paths outside the manifest's folder")
    p.add_argument("--no-require-age", dest="require_age", action="store_false", default=S,
                   help="accept subjects without an age")
    p.add_argument("--no-tissue", dest="tissue", action="store_false", default=S,
                   help="no tissue measurement (N4, registration, tissue channels): intensity "
                        "volumes only, e.g. for phantoms")
    p.add_argument("--allow-whole-head", action="store_true", default=S,
                   help="process images that look like whole heads (not skull-stripped) as "
                        "they are, instead of quarantining them as not_skull_stripped")
    p.add_argument("--ray-address", default=S, help="join this Ray cluster (engine ray)")


def _add_pretrain_sorter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=S, metavar="SORTER_FILE", help="output .safetensors file")
    p.add_argument("--kind", default=S, help="sorter family (pairwise)")
    p.add_argument("--seq-len", type=int, default=S, help="training sequence length (32)")
    p.add_argument("--steps", type=int, default=S, help="optimisation steps (2000)")
    p.add_argument("--batch-size", type=int, default=S, help="sequences per step (64)")
    p.add_argument("--lr", type=float, default=S, help="learning rate (1e-3)")
    p.add_argument("--workers", type=int, default=S, help="Ray Train workers (1)")
    p.add_argument("--gpu", action="store_true", default=S, help="train on GPU workers")
    p.add_argument("--seed", type=int, default=S, help="random seed (0)")
    p.add_argument("--checkpoint-every", type=int, default=S, help="steps between checkpoints")
    p.add_argument("--max-failures", type=int, default=S,
                   help="worker failures to recover from (2)")
    p.add_argument("--storage-path", default=S, help="Ray Train storage (local folder or URI)")
    p.add_argument("--ray-address", default=S, help="join this Ray cluster")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", nargs="?", default=S, metavar="CACHE_DIR",
                   help="cache folder written by `brainrank ingest`")
    p.add_argument("--out", default=S, metavar="MODEL_DIR", help="model folder to create")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--sorter", default=S, metavar="FILE",
                      help="rank loss through this learned sorter (.safetensors file or the "
                           "name of a shipped sorter)")
    rank.add_argument("--rank-loss", choices=["soft", "none"], default=S,
                      help="rank loss without a sorter: soft ranks or none (soft)")
    p.add_argument("--epochs", type=int, default=S,
                   help="epochs of every training job (default: rankcore.train.default_config)")
    p.add_argument("--batch-size", type=int, default=S,
                   help="global mini-batch, the sequence the rank loss ranks (default: "
                        "rankcore.train.default_config)")
    p.add_argument("--workers", type=int, default=S,
                   help="local: stage-1 jobs run side by side in this many processes; "
                        "ray: Ray Train workers per stage (1)")
    p.add_argument("--gpu", action="store_true", default=S, help="train on CUDA (bf16)")
    p.add_argument("--seed", type=int, default=S, help="random seed (0)")
    p.add_argument("--k-folds", type=int, default=S,
                   help="cross-fitting folds for stage 2's out-of-fold inputs (3)")
    p.add_argument("--test-fraction", type=float, default=S,
                   help="when no cached row is labelled test, hold out this share of the "
                        "participants as the test split, as `pipeline` does (0.2; 0: none)")
    p.add_argument("--split-seed", type=int, default=S,
                   help="seed of the test hold-out's stable hash (0)")
    p.add_argument("--engine", choices=["local", "ray"], default=S,
                   help="train in this process or on Ray Train (local)")
    p.add_argument("--storage-path", default=S,
                   help="Ray Train storage (engine ray), outside MODEL_DIR")
    p.add_argument("--ray-address", default=S, help="join this Ray cluster (engine ray)")
    p.add_argument("--spacing", type=float, default=S,
                   help="pick the cache of this voxel size (mm) when it holds several")
    p.add_argument("--shape", type=int, nargs=3, default=S, metavar=("X", "Y", "Z"),
                   help="pick the cache of this grid when it holds several")
    p.add_argument("--tissue", action=argparse.BooleanOptionalAction, default=S,
                   help="pick the cache ingested with (--tissue) or without (--no-tissue) "
                        "tissue measurement when it holds both")
    p.add_argument("--allow-incomplete-cache", action="store_true", default=S,
                   help="use a cache whose ingest was interrupted (refused by default; "
                        "results then cover only the subjects cached so far)")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=S, metavar="MODEL_DIR",
                   help="model folder written by `brainrank train`")
    p.add_argument("cache", nargs="?", default=S, metavar="CACHE_DIR",
                   help="cache holding volumes preprocessed as the model expects")
    p.add_argument("--out", default=S, metavar="REPORT_DIR", help="report folder to write")
    p.add_argument("--split", default=S,
                   help="split label to evaluate, or 'all' for every cached subject (test)")
    p.add_argument("--n-boot", type=int, default=S,
                   help="bootstrap resamples for the 95%% intervals (1000; 0: none)")
    p.add_argument("--seed", type=int, default=S, help="bootstrap seed (0)")
    p.add_argument("--gpu", action="store_true", default=S,
                   help="predict on CUDA (engine ray: on GPU workers, checked there)")
    p.add_argument("--engine", choices=["local", "ray"], default=S,
                   help="predict in this process or as Ray tasks that read their own rows "
                        "(local)")
    p.add_argument("--workers", type=int, default=S,
                   help="Ray tasks at a time (engine ray; 1)")
    p.add_argument("--no-store-bias", dest="store_bias", action="store_false", default=S,
                   help="do not store the fitted bias correction in MODEL_DIR/bias.json")
    p.add_argument("--allow-incomplete-cache", action="store_true", default=S,
                   help="use a cache whose ingest was interrupted (refused by default; "
                        "results then cover only the subjects cached so far)")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=S, metavar="MODEL_DIR",
                   help="model folder written by `brainrank train`")
    p.add_argument("cohort", nargs="?", default=S, metavar="COHORT",
                   help="BIDS root or manifest (.csv, .tsv, .parquet); ages optional")
    p.add_argument("--out", default=S, metavar="PREDICTIONS_FILE",
                   help="output table, .csv or .parquet")
    p.add_argument("--bias-correct", action="store_true", default=S,
                   help="fill corrected_age/corrected_gap with the correction stored by "
                        "`brainrank evaluate` (MODEL_DIR/bias.json)")
    p.add_argument("--bias-method", choices=["beheshti", "cole"], default=S,
                   help="form of the bias correction (beheshti)")
    p.add_argument("--bias-file", default=S, metavar="FILE",
                   help="bias.json to use instead of MODEL_DIR/bias.json")
    p.add_argument("--cache", default=S, metavar="CACHE_DIR",
                   help="preprocessing cache (default: <PREDICTIONS_FILE stem>.cache next to "
                        "the output)")
    p.add_argument("--spacing", type=float, default=S,
                   help="expected voxel size, mm: refused unless it is the model's")
    p.add_argument("--shape", type=int, nargs=3, default=S, metavar=("X", "Y", "Z"),
                   help="expected grid: refused unless it is the model's")
    p.add_argument("--workers", type=int, default=S, help="preprocessing workers (1)")
    p.add_argument("--engine", choices=["local", "ray"], default=S,
                   help="preprocess in local processes or as Ray tasks (local)")
    p.add_argument("--allow-outside-root", action="store_true", default=S,
                   help="accept manifest paths outside the manifest's folder")
    p.add_argument("--gpu", action="store_true", default=S, help="predict on CUDA")
    p.add_argument("--max-failed-fraction", type=float, default=S,
                   help="exit 3 when more than this fraction is set aside (1.0)")
    p.add_argument("--allow-whole-head", action="store_true", default=S,
                   help="predict images that look like whole heads (not skull-stripped) "
                        "instead of setting them aside as not_skull_stripped")


def _add_card(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=S, metavar="MODEL_DIR",
                   help="model folder written by `brainrank train`")
    p.add_argument("--json", dest="as_json", action="store_true", default=S,
                   help="print the raw card.json")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=S, metavar="RUN_DIR",
                   help="run folder (a rerun reuses every stage whose inputs did not change)")
    p.add_argument("--cohort", default=S, metavar="COHORT",
                   help="BIDS root or manifest (.csv, .tsv, .parquet); default: simulate one")
    p.add_argument("--spacing", type=float, default=S, help="ingest voxel size, mm (2.0)")
    p.add_argument("--shape", type=int, nargs=3, default=S, metavar=("X", "Y", "Z"),
                   help="ingest grid in voxels (80 96 80)")
    p.add_argument("--no-tissue", dest="tissue", action="store_false", default=S,
                   help="ingest without tissue measurement (intensity volumes only)")
    p.add_argument("--allow-outside-root", action="store_true", default=S,
                   help="accept manifest paths outside the manifest's folder")
    p.add_argument("--max-failed-fraction", type=float, default=S,
                   help="stop (exit 3) when more than this fraction is quarantined (0.5)")
    p.add_argument("--ray-address", default=S,
                   help="join this Ray cluster (default: $RAY_ADDRESS; else Ray starts "
                        "locally when a stage needs it)")
    p.add_argument("--until", choices=["simulate", "ingest", "sorter", "train", "evaluate"],
                   default=S, help="stop after this stage (evaluate)")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", nargs="?", default=None, metavar="COMMAND",
                   choices=["pipeline", "simulate", "ingest", "pretrain-sorter", "train",
                            "evaluate", "predict"],
                   help="the brainrank command the job runs (pipeline)")
    p.add_argument("--address", default=S, metavar="URL",
                   help="the cluster's job server, http://HEAD:8265 (default: "
                        "$RAY_API_SERVER_ADDRESS)")
    p.add_argument("--config", dest="job_config", default=S, metavar="FILE",
                   help="the job command's --config file (validated here, sent with the job)")
    p.add_argument("--job-args", default=S, metavar="OPTIONS",
                   help='the job command\'s options as one string, e.g. "--out RUN_DIR"')
    p.add_argument("--working-dir", default=S, metavar="DIR",
                   help="brainrank source folder uploaded as the job's code (.)")
    p.add_argument("--pip", action="append", default=S, metavar="REQUIREMENT",
                   help="pip requirement to add to the job's environment (repeatable)")
    p.add_argument("--env", action="append", default=S, metavar="KEY=VALUE",
                   help="environment variable of the job, e.g. PREFECT_API_URL (repeatable)")
    p.add_argument("--wait", action="store_true", default=S,
                   help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--timeout", type=float, default=S, help="stop waiting after S seconds")
    p.add_argument("--submission-id", default=S, help="the job's id (default: Ray picks one)")
    p.add_argument("--num-cpus", type=float, default=S, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=S, help="GPUs reserved for the driver")
    p.add_argument("--python", default=S, metavar="EXE",
                   help="the Python that runs the job on the cluster (python)")
    p.add_argument("--token-file", default=S, metavar="FILE",
                   help="the cluster's auth token (RAY_AUTH_MODE=token clusters; default "
                        "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=S, metavar="DIR",
                   help="folder of every deployment's outputs (runs/scheduled)")
    p.add_argument("--cohort", default=S, metavar="COHORT",
                   help="cohort of the scheduled runs (default: a simulated one)")
    p.add_argument("--only", nargs="+", default=S, metavar="FLOW/NAME",
                   help="serve only these deployments (e.g. pipeline/weekly)")
    p.add_argument("--limit", type=int, default=S, help="flow runs at a time")


#: command -> the parameter naming what it writes (locked for the run: one writer at a time).
OUTPUT_FIELDS: dict[str, str] = {
    "simulate": "out_dir", "pretrain-sorter": "out", "train": "out", "evaluate": "out",
    "predict": "out", "pipeline": "out",
}

_ADDERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "simulate": _add_simulate,
    "ingest": _add_ingest,
    "pretrain-sorter": _add_pretrain_sorter,
    "train": _add_train,
    "evaluate": _add_evaluate,
    "predict": _add_predict,
    "card": _add_card,
    "pipeline": _add_pipeline,
    "submit": _add_submit,
    "serve": _add_serve,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("brainrank")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


#: Parsed arguments that steer the command line itself, not a command's parameters (submit's
#: `--config` is its `job_config` parameter: the job command's own config file).
CLI_ONLY = ("command", "config", "verbose", "quiet")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options given on the command line (``shape`` as a tuple)."""
    given = {k: v for k, v in vars(args).items() if k not in CLI_ONLY}
    if "shape" in given:
        given["shape"] = tuple(given["shape"])
    return given


def _set_verbosity(verbose: bool, quiet: bool) -> None:
    """-v: per-subject DEBUG lines reach the console; -q: warnings only, no progress bars."""
    import logging

    if not (verbose or quiet):
        return
    from rankcore.progress import set_quiet
    from tasks import _logs

    if quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
        set_quiet(True)
        _logs.set_level(logging.WARNING)
    else:
        _logs.set_level(logging.DEBUG)
    logging.getLogger("rankcore").setLevel(logging.WARNING if quiet else logging.DEBUG)


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
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _ADDERS[name](p)
        if not any("--config" in a.option_strings for a in p._actions):
            p.add_argument("--config", default=None, metavar="FILE",
                           help="YAML or JSON file whose keys mirror the options")
    return parser


def _prepare_environment() -> None:
    # A temporary Prefect server takes 7-16 s to start on 2 cores; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # The telemetry heartbeat of a temporary server trips "database is locked" under load.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
