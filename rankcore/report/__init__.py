"""Evaluation reports: metrics with bootstrap intervals, bias correction, plots, Markdown/HTML.

Public API:

- :func:`evaluate_model` — predict a split of a cache with a saved cascade, write REPORT_DIR
- :func:`build_metrics`, :func:`metric_block` — the metrics.json blocks
- :func:`predictions_table`, :func:`write_table` — the predictions table (CSV / Parquet)
- :func:`plot_pred_vs_age`, :func:`plot_gap_vs_age`, :func:`plot_site_boxes` — figures
- :func:`report_blocks`, :func:`render_markdown`, :func:`render_html` — the documents

:func:`evaluate_model` (torch, the model) is imported on first use.
"""

from rankcore.inference.table import PREDICTION_COLUMNS, predictions_table, write_table
from rankcore.report.metrics_table import METRIC_NAMES, build_metrics, metric_block
from rankcore.report.plots import plot_gap_vs_age, plot_pred_vs_age, plot_site_boxes
from rankcore.report.render import Figure, render_html, render_markdown, report_blocks

_LAZY = {"evaluate_model": "rankcore.report.evaluate", "Evaluation": "rankcore.report.evaluate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankcore.report' has no attribute {name!r}")


__all__ = [
    "METRIC_NAMES",
    "PREDICTION_COLUMNS",
    "Evaluation",
    "Figure",
    "build_metrics",
    "evaluate_model",
    "metric_block",
    "plot_gap_vs_age",
    "plot_pred_vs_age",
    "plot_site_boxes",
    "predictions_table",
    "render_html",
    "render_markdown",
    "report_blocks",
    "write_table",
]
