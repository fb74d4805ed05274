"""Flow `train`: train the two-stage cascade on a Parquet cache into MODEL_DIR.

Run it as `brainrank train CACHE_DIR --out MODEL_DIR` or `python -m flows.train ...`.
Tasks: plan (split, folds, checks) -> one task per job (fold-0 … fold-K−1, stage1, stage2;
each retried once, resuming from its last epoch) -> finish (card, curves, atomic rename).
With engine "local" and ``workers > 1`` the fold and final stage-1 jobs run in a process pool;
with engine "ray" every job trains on Ray Train, called from inside its task. Per-epoch log
lines (loss parts, val MAE and SRCC) reach the flow's log, and the progress artifact
``train-progress`` shows the share of planned epochs done. A MODEL_DIR that already holds the
same run (same config and data) is reused without training.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows._server import temporary_server
from flows.params import TrainParams
from rankcore._lock import run_lock
from rankcore.errors import BrainrankError
from rankcore.train.cascade_plan import CARD_FILE
from tasks.train import (
    cache_complete_task,
    finish_training_task,
    plan_training_task,
    release_ray,
    summarise,
    train_job_task,
)


def train_config(params: TrainParams) -> dict[str, Any]:
    """The stage-1 TrainConfig (as a dict) that ``params`` ask for."""
    return params.train_config()


def preprocess_config(params: TrainParams) -> Any:
    """The PreprocessConfig choosing the cache folder, or None for the cache's only one.

    Raises:
        InputError: several of the cache's configs match ``spacing``/``shape``/``tissue``.
    """
    from rankcore.cache import choose_config

    return choose_config(params.cache, params.spacing, params.shape, params.tissue)


def _plan_args(params: TrainParams) -> dict[str, Any]:
    return {"cache": params.cache, "out": params.out, "config": train_config(params),
            "k_folds": params.k_folds, "val_fraction": params.val_fraction,
            "preprocess": preprocess_config(params), "engine": params.engine,
            "workers": params.workers, "use_gpu": params.gpu,
            "storage_path": params.storage_path, "stage2": params.stage2_options or None,
            "test_fraction": params.test_fraction, "split_seed": params.split_seed}


def _markdown(summary: dict[str, Any]) -> str:
    def cell(m: dict[str, float] | None, key: str) -> str:
        return "n/a" if m is None else f"{m[key]:.3f}"

    lines = [f"# Cascade `{summary['model_dir']}`", "",
             f"{summary['n_train']} training / {summary['n_val']} validation subjects "
             f"(split: {summary['split_source']}; test: {summary.get('test_source', 'n/a')}); "
             f"data digest `{summary['data_digest'][:12]}`",
             "", "| predictions | MAE (y) | RMSE (y) | SRCC | Pearson r |",
             "|---|---|---|---|---|"]
    names = {"val_cascade": "validation, cascade", "val_stage1": "validation, stage 1",
             "train_stage1_oof": "training, stage 1 out-of-fold",
             "train_stage1_in_sample": "training, stage 1 in-sample"}
    for key, label in names.items():
        m = summary["metrics"].get(key)
        lines.append(f"| {label} | {cell(m, 'mae')} | {cell(m, 'rmse')} | {cell(m, 'srcc')} | "
                     f"{cell(m, 'pearson_r')} |")
    lines += ["", "| job | epochs run | best epoch | seconds |", "|---|---|---|---|"]
    for job, j in summary["jobs"].items():
        lines.append(f"| {job} | {j['epochs_run']} | {j['best_epoch'] + 1} | {j['seconds']} |")
    return "\n".join(lines) + "\n"


def _run_jobs(plan, params: TrainParams, artifact) -> None:
    independent = [job for job in plan.jobs if job != "stage2"]
    if plan.engine == "local" and plan.workers > 1:
        # Side by side in processes; the progress artifact moves as each job completes.
        done = 0
        runner = ProcessPoolTaskRunner(max_workers=min(plan.workers, len(independent)))
        with runner:
            futures = [runner.submit(train_job_task, {"plan": plan, "job": job})
                       for job in independent]
            for future in as_completed(futures):
                done += plan.epochs(future.result()["job"])
                update_progress_artifact(artifact, round(100.0 * done / plan.total_epochs, 1))
    else:
        for job in independent:
            train_job_task(plan, job, artifact, params.ray_address)
    train_job_task(plan, "stage2", artifact, params.ray_address)


@flow(name="train", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def train_flow(params: TrainParams) -> dict:
    """Train the cascade of ``params.cache`` into ``params.out``; return a JSON-able summary.

    Keys: model_dir, reused, training_key, data_digest, n_train, n_val, split_source,
    metrics (val_cascade, val_stage1, train_stage1_oof, train_stage1_in_sample: each MAE,
    RMSE, SRCC, Pearson r, or None without validation), jobs (epochs run, best epoch and
    seconds per job), seconds.
    """
    logger = get_run_logger()
    with run_lock(params.out):
        return _train(params, logger)


def _train(params: TrainParams, logger) -> dict:
    warning = cache_complete_task(params.cache, preprocess_config(params),
                                  params.allow_incomplete_cache)
    if warning:
        logger.warning(warning)
    plan = plan_training_task(**_plan_args(params))
    if plan.reuse:
        logger.info("reusing %s: its card matches this config and data (digest %s); nothing "
                    "to train", plan.model_dir, plan.data_digest[:12])
        card = json.loads((Path(plan.model_dir) / CARD_FILE).read_text())
        return summarise(card, plan.model_dir, reused=True)
    logger.info("training a cascade into %s: %d training / %d validation subjects (split: %s), "
                "%d folds, %d epochs per job, engine %s, %d worker(s)", plan.model_dir,
                len(plan.split["train"]), len(plan.split["val"]), plan.split["source"],
                plan.k_folds, plan.config["epochs"], plan.engine, plan.workers)
    artifact = create_progress_artifact(
        0.0, key="train-progress", description=f"cascade training into {plan.model_dir}")
    try:
        _run_jobs(plan, params, artifact)
        summary = finish_training_task(plan)
    finally:
        release_ray()
    update_progress_artifact(artifact, 100.0, description="done")
    create_markdown_artifact(markdown=_markdown(summary), key="train-summary",
                             description="cascade training: metrics and jobs")
    return summary


def run_cli(params: TrainParams) -> int:
    """Check the inputs, run the flow, print the summary; 2 with one line on unusable input."""
    from rankcore.cache import check_complete
    from rankcore.train.cascade_plan import plan_cascade

    try:
        # Unusable input fails here, in one line, before a flow run (and its logs) starts.
        args = _plan_args(params)
        warning = check_complete(params.cache, args["preprocess"],
                                 allow_incomplete=params.allow_incomplete_cache)
        if warning:
            print(f"brainrank train: warning: {warning}", file=sys.stderr)
        plan_cascade(args.pop("cache"), args.pop("out"), args.pop("config"), **args)
        with temporary_server():
            summary = train_flow(params)
    except BrainrankError as exc:
        print(f"brainrank train: error: {exc}", file=sys.stderr)
        return 2
    m = summary["metrics"]
    verb = "reused" if summary["reused"] else "trained"
    print(f"{verb} cascade: {summary['model_dir']} ({summary['n_train']} training / "
          f"{summary['n_val']} validation subjects, {summary['seconds']:.0f} s of training)")
    if summary["test_source"] == "held_out":
        print(f"held out {summary['n_test']} test subject(s) by the stable hash (split seed "
              f"{params.split_seed}): score them with `brainrank evaluate {summary['model_dir']} "
              f"{params.cache} --out REPORT_DIR`")
    elif summary["test_source"] == "none":
        print("no test split: every subject with an age trained or validated this model")
    for key, label in (("val_stage1", "stage 1"), ("val_cascade", "cascade")):
        if m.get(key):
            print(f"validation {label}: MAE {m[key]['mae']:.2f} y, SRCC {m[key]['srcc']:.3f}")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["train", *sys.argv[1:]]))
