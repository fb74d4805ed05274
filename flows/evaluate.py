"""Flow `evaluate`: score a trained cascade on one split of a cache and write the report.

Run it as `brainrank evaluate MODEL_DIR CACHE_DIR --out REPORT_DIR [--split S]` or
`python -m flows.evaluate ...`. One task predicts the split (every subject once; with
`--engine ray` as `--workers` Ray tasks that read their own rows, on GPU workers with
`--gpu`, the CUDA check on the workers), fits the
bias correction on the model's validation subjects, and writes REPORT_DIR atomically
(metrics.json, predictions.csv, bias.json, PNG plots, report.md, report.html). The flow
publishes the report as a markdown artifact (``evaluation-report``) and the metrics as a
table artifact (``evaluation-metrics``).
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._server import temporary_server
from flows.params import EvaluateParams
from rankcore.errors import BrainrankError
from rankcore.report.render import metrics_rows
from tasks.evaluate import evaluate_task


def _device(params: EvaluateParams) -> str:
    return "cuda" if params.gpu else "cpu"


@flow(name="evaluate", log_prints=False)
def evaluate_flow(params: EvaluateParams) -> dict:
    """Evaluate ``params.model_dir`` on ``params.split`` of ``params.cache`` into ``params.out``.

    Returns:
        ``{"out_dir", "files", "metrics", "summary_markdown", "warnings"}`` (JSON-able;
        ``metrics`` is the content of metrics.json).
    """
    logger = get_run_logger()
    result = evaluate_task(params.model_dir, params.cache, params.out, params.split,
                           params.n_boot, params.seed, params.level, params.batch_size,
                           _device(params), params.store_bias, params.allow_incomplete_cache,
                           params.engine, params.workers)
    m = result["metrics"]
    logger.info("evaluated %d subject(s) of split %r: SRCC %s, MAE %s y; report in %s",
                m["n"], params.split, m.get("srcc"), m.get("mae"), result["out_dir"])
    for warning in result["warnings"]:
        logger.warning(warning)
    create_markdown_artifact(markdown=result["summary_markdown"], key="evaluation-report",
                             description=f"evaluation of {params.model_dir} ({params.split})")
    create_table_artifact(table=metrics_rows(m), key="evaluation-metrics",
                          description="cascade metrics with 95 % bootstrap intervals, stage 1 "
                                      "and bias-corrected values")
    return result


def _fmt(block: dict, key: str) -> str:
    value = block.get(key)
    low, high = block.get("ci", {}).get(key, [None, None])
    text = "n/a" if value is None else f"{value:.3f}"
    if low is not None and high is not None:
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def run_cli(params: EvaluateParams) -> int:
    """Check the inputs, run the flow, print the headline; 2 with one line on unusable input."""
    from rankcore.report.evaluate import check_evaluation

    try:
        # Unusable input fails here, in one line, before a flow run (and its logs) starts.
        check_evaluation(params.model_dir, params.cache, params.out, split=params.split,
                         device=_device(params),
                         allow_incomplete_cache=params.allow_incomplete_cache,
                         engine=params.engine, workers=params.workers)
        with temporary_server():
            result = evaluate_flow(params)
    except BrainrankError as exc:
        print(f"brainrank evaluate: error: {exc}", file=sys.stderr)
        return 2
    m = result["metrics"]
    print(f"evaluated {m['n']} subject(s) of split {params.split!r}")
    print(f"cascade: SRCC {_fmt(m, 'srcc')}, MAE {_fmt(m, 'mae')} y")
    print(f"stage 1: SRCC {_fmt(m['stage1'], 'srcc')}, MAE {_fmt(m['stage1'], 'mae')} y")
    bc = m.get("bias_corrected", {})
    if bc.get("available"):
        print(f"bias-corrected (Beheshti/Smith, fitted on validation): MAE "
              f"{_fmt(bc['beheshti'], 'mae')} y")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(f"report: {result['out_dir']}/report.html")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
