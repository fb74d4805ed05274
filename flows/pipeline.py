"""Flow `pipeline`: the main job, from a cohort (or a simulated one) to an evaluation report.

Run it as `brainrank pipeline --out RUN_DIR [--cohort COHORT] [--config FILE]` or
`python -m flows.pipeline ...`. Stages, each a subflow (or nothing, when reused):

1. simulate   the default cohort into RUN_DIR/cohort (only without a cohort)
2. ingest     the cohort (with a held-out test split when it names none) into RUN_DIR/cache
3. sorter     the shipped sorter, a given file, or one pretrained (on Ray) into RUN_DIR
4. train      the cascade: cross-fitted stage 1, out-of-fold predictions, stage 2
5. evaluate   the test split: metrics, plots, report.md / report.html in RUN_DIR/report

then RUN_DIR/pipeline.json records every stage's status, digests, timings and outputs, and
a markdown artifact (``pipeline-summary``) shows them. A stage whose inputs did not change
since the last run is reused as it is (see flows/_run_state.py), so a warm rerun takes
seconds and a changed option reruns its stage and the stages after it only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._run_state import (
    STAGES,
    RunLayout,
    RunState,
    digest,
    read_run_state,
    run_state_problem,
    sha256_file,
)
from flows._server import temporary_server
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.params import PipelineParams
from flows.pretrain_sorter import pretrain_sorter_flow
from flows.simulate import simulate_flow
from flows.train import _plan_args, train_flow
from rankcore._lock import run_lock
from rankcore.errors import BrainrankError, InputError
from tasks.pipeline import cache_digest_task, prepare_cohort_task, training_key_task

#: Exit code of a run stopped because ingest quarantined too much of the cohort.
EXIT_QUARANTINE = 3
_SIMULATION_STATE = Path("derivatives") / "simulation" / "simulation.json"


class _Run:
    """One execution of the pipeline: the layout, the state file and the run logger."""

    def __init__(self, params: PipelineParams, layout: RunLayout, state: RunState, logger):
        self.params, self.layout, self.state, self.log = params, layout, state, logger
        self.stage: str | None = None
        self.fail_kind = "error"
        self._t0 = 0.0

    def begin(self, stage: str) -> None:
        self.stage, self._t0 = stage, time.perf_counter()
        self.log.info("stage %d/%d %s: starting", STAGES.index(stage) + 1, len(STAGES), stage)

    def done(self, status: str, input_digest: str, output_digest: str | None,
             outputs: dict[str, Any] | None = None, summary: dict[str, Any] | None = None,
             note: str = "") -> dict[str, Any]:
        seconds = time.perf_counter() - self._t0
        rec = self.state.record(self.stage, status, input_digest=input_digest,
                                output_digest=output_digest, seconds=seconds, outputs=outputs,
                                summary=summary)
        self.log.info("stage %d/%d %s: %s in %.1f s%s", STAGES.index(self.stage) + 1,
                      len(STAGES), self.stage, status, seconds, f" ({note})" if note else "")
        return rec

    def reuse(self, rec: dict[str, Any], note: str) -> dict[str, Any]:
        return self.done("reused", rec["input_digest"], rec["output_digest"], rec["outputs"],
                         rec["summary"], note)


# ------------------------------------------------------------------------------ stages


def _simulate(run: _Run) -> str:
    """Stage 1: the cohort to ingest (the given one, or the simulated one)."""
    run.begin("simulate")
    p, cohort_dir = run.params, run.layout.cohort
    if p.cohort is not None:
        run.done("skipped", digest("simulate", None), None, {"cohort": p.cohort},
                 note=f"cohort given: {p.cohort}")
        return p.cohort
    sim = p.simulate_params(str(cohort_dir))
    key = digest("simulate", sim.model_dump(exclude={"out_dir", "workers"}))
    rec = run.state.matches("simulate", key)
    if rec is not None and (cohort_dir / "participants.tsv").is_file():
        run.reuse(rec, f"{sim.subjects} subjects in {cohort_dir}")
        return str(cohort_dir)
    if run.state.previous("simulate") is not None and (cohort_dir / _SIMULATION_STATE).is_file():
        shutil.rmtree(cohort_dir)  # our own simulation of other settings: made again
    root = simulate_flow(sim)
    run.done("ran", key, key, {"cohort": root},
             {"subjects": sim.subjects, "seed": sim.seed, "corrupt": sim.corrupt})
    return root


def _ingest(run: _Run, cohort: str) -> dict[str, Any]:
    """Stage 2: the cache and its data digest; stops the run when too much is quarantined."""
    run.begin("ingest")
    p, cache = run.params, str(run.layout.cache)
    prepared = prepare_cohort_task(cohort, str(run.layout.manifest), p.allow_outside_root,
                                   p.test_fraction, p.split_seed)
    run.log.info("cohort %s: %d row(s), splits %s (%s)", cohort, prepared["rows"],
                 prepared["splits"], "from the cohort table" if prepared["split_source"] ==
                 "cohort" else f"test split of {p.test_fraction:g} held out, seed "
                 f"{p.split_seed}, written to {prepared['cohort']}")
    ing = p.ingest_params(prepared["cohort"], cache,
                          allow_outside_root=prepared["allow_outside_root"])
    key = digest("ingest", prepared["fingerprint"], prepared["set_aside"],
                 ing.model_dump(exclude={"workers", "batch_size", "engine", "ray_address",
                                         "max_failed_fraction"}))
    rec, data = run.state.matches("ingest", key), None
    if rec is not None:
        try:
            data = cache_digest_task(cache, p.spacing, p.shape, p.tissue)
        except InputError:
            data = None  # the cache is gone or damaged: ingest again
    if rec is not None and data is not None and data["data_digest"] == rec["output_digest"]:
        rec = run.reuse(rec, f"{data['rows']} cached subject(s), splits {data['splits']}")
    else:
        summary = ingest_flow(ing)
        data = cache_digest_task(cache, p.spacing, p.shape, p.tissue)
        set_aside = len(prepared["set_aside"])
        total = summary["total"] + set_aside
        failed = summary["n_quarantined"] + set_aside
        summary = {**summary, "set_aside_in_table": prepared["set_aside"],
                   "pipeline_failed_fraction": failed / total if total else 0.0,
                   "split_source": prepared["split_source"], "cohort_splits": prepared["splits"],
                   "cache_splits": data["splits"]}
        rec = run.done("ran", key, data["data_digest"],
                       {"cache": cache, "cohort_manifest": prepared["cohort"],
                        "quarantine": summary["quarantine_path"]}, summary,
                       f"{summary['ingested']} ingested, {summary['reused']} reused, "
                       f"{failed} quarantined of {total}")
    failed_fraction = rec["summary"]["pipeline_failed_fraction"]
    if failed_fraction > p.max_failed_fraction:
        run.fail_kind = "quarantine_limit"
        raise InputError(
            f"{failed_fraction:.1%} of the cohort was quarantined, more than "
            f"max_failed_fraction {p.max_failed_fraction:g}; see "
            f"{rec['outputs'].get('quarantine')}")
    return {"data_digest": rec["output_digest"], **data}


def _sorter(run: _Run) -> tuple[str | None, str | None]:
    """Stage 3: (the train stage's ``sorter`` value, its file's sha256), or (None, None)."""
    run.begin("sorter")
    p, layout = run.params, run.layout
    source = p.sorter.source
    if source in ("soft", "none"):
        run.done("skipped", digest("sorter", source), None, note=f"rank loss {source!r}")
        return None, None
    if source in ("shipped", "file"):
        from rankcore.train.objective import resolve_sorter

        value = p.sorter.name if source == "shipped" else p.sorter.file
        path = resolve_sorter(value)  # InputError names the shipped sorters
        sha = sha256_file(path)
        run.done("skipped", digest("sorter", source, value), sha,
                 {"sorter_file": str(path)}, {"source": source, "sorter": value},
                 f"{source} sorter {value}")
        return value, sha
    pre = p.pretrain_params(str(layout.sorter))
    key = digest("sorter", source, pre.model_dump(exclude={"out", "ray_address",
                                                           "storage_path"}))
    rec = run.state.matches("sorter", key)
    if rec is not None and layout.sorter.is_file() and sha256_file(layout.sorter) == \
            rec["output_digest"]:
        run.reuse(rec, f"{layout.sorter}")
        return str(layout.sorter), rec["output_digest"]
    card = pretrain_sorter_flow(pre)
    sha = sha256_file(layout.sorter)
    run.done("ran", key, sha, {"sorter": str(layout.sorter)},
             {"kind": card.get("kind"), "steps": card.get("steps"),
              "reused_file": bool(card.get("reused"))})
    return str(layout.sorter), sha


def _card(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / "card.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _train(run: _Run, data: dict[str, Any], sorter: str | None, sorter_sha: str | None
           ) -> str:
    """Stage 4: the cascade in RUN_DIR/model; returns its training key."""
    run.begin("train")
    p, model = run.params, run.layout.model
    tp = p.train_params(str(run.layout.cache), str(model), sorter)
    key = digest("train", tp.model_dump(exclude={"cache", "out", "workers", "engine",
                                                 "storage_path", "ray_address"}),
                 data["data_digest"], sorter_sha)
    rec, card = run.state.matches("train", key), _card(model)
    if rec is not None and card is not None and card.get("training_key") == rec["output_digest"]:
        run.reuse(rec, f"cascade {model}")
        return rec["output_digest"]
    if model.exists():
        wanted = training_key_task({**_plan_args(tp), "out": str(run.layout.probe)})
        if card is None or card.get("training_key") != wanted:
            run.log.info("moving the cascade trained with other settings to %s",
                         run.layout.retire(model))
    summary = train_flow(tp)
    summary.pop("jobs", None)
    run.done("reused" if summary["reused"] else "ran", key, summary["training_key"],
             {"model": summary["model_dir"]}, summary)
    return summary["training_key"]


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "mae", "rmse", "pearson_r", "srcc", "r2")
    head = {k: metrics.get(k) for k in keys}
    head["stage1"] = {k: metrics.get("stage1", {}).get(k) for k in ("mae", "srcc")}
    head["split"] = metrics.get("split")
    return head


def _evaluate(run: _Run, training_key: str, data: dict[str, Any]) -> dict[str, Any]:
    """Stage 5: the report in RUN_DIR/report; returns the headline metrics."""
    run.begin("evaluate")
    p, report = run.params, run.layout.report
    ep = p.evaluate_params(str(run.layout.model), str(run.layout.cache), str(report))
    # Where the forward passes run (engine, workers, GPU, batch) does not change the report.
    key = digest("evaluate", ep.model_dump(exclude={"model_dir", "cache", "out", "gpu",
                                                    "batch_size", "engine", "workers"}),
                 training_key, data["data_digest"])
    rec = run.state.matches("evaluate", key)
    try:
        metrics = json.loads((report / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        metrics = None
    if rec is not None and metrics is not None and metrics.get("training_key") == training_key:
        run.reuse(rec, f"report {report}")
        return _headline(metrics)
    result = evaluate_flow(ep)
    head = _headline(result["metrics"])
    run.done("ran", key, digest(head), {"report": result["out_dir"],
                                        "report_html": str(report / "report.html")},
             {"headline": head, "warnings": result["warnings"]})
    return head


# -------------------------------------------------------------------------------- flow


def _run_stages(run: _Run) -> dict[str, Any] | None:
    """Every stage up to ``params.until``; the headline metrics (None when stopped early)."""
    until = run.params.until
    cohort = _simulate(run)
    if until == "simulate":
        return None
    data = _ingest(run, cohort)
    if until == "ingest":
        return None
    sorter, sorter_sha = _sorter(run)
    if until == "sorter":
        return None
    training_key = _train(run, data, sorter, sorter_sha)
    if until == "train":
        return None
    return _evaluate(run, training_key, data)


def _status(rec: dict[str, Any] | None) -> str:
    return "not run" if rec is None or rec.get("carried") else rec["status"]


def _summary_markdown(state: dict[str, Any]) -> str:
    lines = [f"# Pipeline run `{state['run_dir']}`", "",
             "| stage | status | seconds |", "|---|---|---|"]
    for name in STAGES:
        rec = state["stages"].get(name)
        seconds = "" if _status(rec) == "not run" else rec["seconds"]
        lines.append(f"| {name} | {_status(rec)} | {seconds} |")
    head = state.get("headline") or {}
    if head:
        lines += ["", f"Test split ({head.get('split')}, n = {head.get('n')}): MAE "
                      f"{_num(head.get('mae'))} y, SRCC {_num(head.get('srcc'))}; stage 1 MAE "
                      f"{_num(head['stage1'].get('mae'))} y.", "",
                  f"Report: `{state['paths'].get('report_html')}`"]
    return "\n".join(lines) + "\n"


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def resolve_ray_address(params: PipelineParams) -> str | None:
    """The cluster to join: ``params.ray_address``, else $RAY_ADDRESS, else None (local)."""
    return params.ray_address or os.environ.get("RAY_ADDRESS") or None


@flow(name="pipeline", log_prints=False)
def pipeline_flow(params: PipelineParams) -> dict[str, Any]:
    """Run every stage into ``params.out`` (RUN_DIR), reusing unchanged stages.

    Returns:
        The content of RUN_DIR/pipeline.json (status, stages, paths, headline metrics).
    """
    logger = get_run_logger()
    with run_lock(params.out):
        return _pipeline(params, logger)


def _pipeline(params: PipelineParams, logger) -> dict[str, Any]:
    t0 = time.perf_counter()
    params = params.model_copy(update={"ray_address": resolve_ray_address(params)})
    layout = RunLayout.create(params.out)
    state = RunState(layout, params.model_dump(mode="json"))
    if state.problem:
        logger.warning(state.problem)
    run = _Run(params, layout, state, logger)
    logger.info("pipeline into %s (cohort: %s; Ray: %s)", layout.run_dir,
                params.cohort or "simulated", params.ray_address or "local when needed")
    try:
        headline = _run_stages(run)
    except BaseException as exc:
        state.fail(run.stage, exc, run.fail_kind)
        raise
    result = state.finish(time.perf_counter() - t0, headline)
    create_markdown_artifact(markdown=_summary_markdown(result), key="pipeline-summary",
                             description=f"pipeline run {layout.run_dir}")
    if headline is None:
        logger.info("pipeline stopped after stage %s (until) in %.1f s", params.until,
                    result["seconds"])
    else:
        logger.info("pipeline done in %.1f s: test MAE %s y, SRCC %s; report %s",
                    result["seconds"], _num(headline["mae"]), _num(headline["srcc"]),
                    result["paths"].get("report_html"))
    return result


def run_cli(params: PipelineParams) -> int:
    """Run the flow; print the stages, the report path and the headline metrics.

    Exit codes: 0 done, 2 unusable input (one line on stderr), 3 too much of the cohort
    quarantined; an unexpected failure raises (exit 1 with its traceback).
    """
    try:
        RunLayout.check(params.out)  # an unusable RUN_DIR fails here, before a flow run starts
        problem = run_state_problem(params.out)
        if problem:
            print(f"brainrank pipeline: warning: {problem}", file=sys.stderr)
        with temporary_server():
            result = pipeline_flow(params)
    except BrainrankError as exc:
        print(f"brainrank pipeline: error: {exc}", file=sys.stderr)
        state = read_run_state(params.out) or {}
        if (state.get("error") or {}).get("kind") == "quarantine_limit":
            return EXIT_QUARANTINE
        return 2
    for name in STAGES:
        rec = result["stages"].get(name)
        status = _status(rec)
        print(f"{name:>9}: {status:<8}" + ("" if status == "not run" else
                                           f" {rec['seconds']:8.1f} s"))
    head = result["headline"]
    print(f"pipeline: {result['run_dir']} ({result['seconds']:.1f} s); "
          f"state: {Path(result['run_dir']) / 'pipeline.json'}")
    if head is None:
        print(f"stopped after stage {params.until} (until)")
        return 0
    print(f"report: {result['paths'].get('report_html')}")
    print(f"test split {head['split']!r} (n={head['n']}): MAE {_num(head['mae'])} y, "
          f"SRCC {_num(head['srcc'])} (stage 1: MAE {_num(head['stage1']['mae'])} y, "
          f"SRCC {_num(head['stage1']['srcc'])})")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["pipeline", *sys.argv[1:]]))
