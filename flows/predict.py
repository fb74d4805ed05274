"""Flow `predict`: apply a trained cascade to a new cohort and write a predictions table.

Run it as `brainrank predict MODEL_DIR COHORT --out PREDICTIONS_FILE [--bias-correct]` or
`python -m flows.predict ...`. One task ingests the cohort with exactly the model card's
preprocessing (quarantining bad subjects as ingest does), predicts every valid subject once
and writes the table (CSV or Parquet by extension) and the quarantine list next to it. The
flow publishes a markdown summary artifact (``prediction-summary``).
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._server import temporary_server
from flows.params import PredictParams
from rankcore.errors import BrainrankError
from tasks.predict import predict_task


def _device(params: PredictParams) -> str:
    return "cuda" if params.gpu else "cpu"


def _markdown(params: PredictParams, s: dict) -> str:
    cats = ", ".join(f"{k} {v}" for k, v in s["quarantined"].items()) or "none"
    bias = f"yes ({s['bias_method']})" if s["bias_corrected"] else "no"
    return "\n".join([
        f"# Predictions of `{params.model_dir}` on `{params.cohort}`", "",
        "| quantity | value |", "|---|---|",
        f"| cohort rows | {s['total']} |", f"| predicted | {s['predicted']} |",
        f"| set aside | {s['n_quarantined']} ({cats}) |", f"| bias-corrected | {bias} |",
        f"| predictions | `{s['out_file']}` |", f"| set aside list | `{s['quarantine_file']}` |",
        f"| preprocessing cache | `{s['cache_dir']}` |", ""])


@flow(name="predict", log_prints=False)
def predict_flow(params: PredictParams) -> dict:
    """Predict ``params.cohort`` with ``params.model_dir`` into ``params.out``.

    Returns:
        :meth:`rankcore.inference.PredictionSummary.to_dict` (out_file, quarantine_file,
        cache_dir, total, predicted, quarantined per category, n_quarantined, ...).
    """
    logger = get_run_logger()
    summary = predict_task(params.model_dir, params.cohort, params.out, params.bias_correct,
                           params.bias_method, params.bias_file, params.cache, params.spacing,
                           params.shape, params.workers, params.engine,
                           params.allow_outside_root, params.batch_size, _device(params),
                           params.max_spacing_ratio, params.allow_whole_head)
    logger.info("predicted %d of %d subject(s) into %s; %d set aside (%s)",
                summary["predicted"], summary["total"], summary["out_file"],
                summary["n_quarantined"], summary["quarantine_file"])
    for warning in summary["warnings"]:
        logger.warning(warning)
    create_markdown_artifact(markdown=_markdown(params, summary), key="prediction-summary",
                             description="subjects predicted and set aside")
    return summary


def run_cli(params: PredictParams) -> int:
    """Check, run the flow, print the summary; 2 on unusable input, 3 when too many fail."""
    from rankcore.inference.cohort import check_prediction

    try:
        # Unusable input (mismatch, missing correction, bad table) fails here, in one line.
        check_prediction(params.model_dir, params.cohort, params.out,
                         bias_correct=params.bias_correct, bias_method=params.bias_method,
                         bias_file=params.bias_file, spacing=params.spacing,
                         shape=params.shape, allow_outside_root=params.allow_outside_root,
                         device=_device(params), max_spacing_ratio=params.max_spacing_ratio,
                         engine=params.engine)
        with temporary_server():
            s = predict_flow(params)
    except BrainrankError as exc:
        print(f"brainrank predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"predicted {s['predicted']} of {s['total']} subject(s): {s['out_file']}")
    cats = ", ".join(f"{k} {v}" for k, v in s["quarantined"].items()) or "none"
    print(f"set aside: {s['n_quarantined']} ({cats}); list: {s['quarantine_file']}")
    for warning in s["warnings"]:
        print(f"warning: {warning}")
    failed = s["n_quarantined"] / s["total"] if s["total"] else 0.0
    if failed > params.max_failed_fraction:
        print(f"brainrank predict: error: {failed:.1%} of the cohort was set aside, more than "
              f"--max-failed-fraction {params.max_failed_fraction:g}; see "
              f"{s['quarantine_file']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["predict", *sys.argv[1:]]))
