"""Prefect task of the predict flow: a thin wrapper around rankcore.inference.predict_cohort.

Not retried: a rerun of the same command is cheap (the preprocessing cache is reused and the
predictions are deterministic), and the output files are written atomically.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import tasks._logs  # noqa: F401  (rankcore's log level)
from rankcore.inference.cohort import predict_cohort


@task(name="predict-cohort", retries=0, cache_policy=NO_CACHE)
def predict_task(model_dir: str, cohort: str, out: str, bias_correct: bool, bias_method: str,
                 bias_file: str | None, cache: str | None, spacing: float | None,
                 shape: tuple[int, int, int] | None, workers: int, engine: str,
                 allow_outside_root: bool, batch_size: int | None, device: str,
                 max_spacing_ratio: float, allow_whole_head: bool = False) -> dict[str, Any]:
    """Ingest the cohort with the model's preprocessing, predict, write the table.

    Returns :meth:`rankcore.inference.PredictionSummary.to_dict`.
    """
    summary = predict_cohort(
        model_dir, cohort, out, bias_correct=bias_correct, bias_method=bias_method,
        bias_file=bias_file, cache_dir=cache, spacing=spacing, shape=shape,
        workers=workers, engine=engine, allow_outside_root=allow_outside_root,
        batch_size=batch_size, device=device, max_spacing_ratio=max_spacing_ratio,
        allow_whole_head=allow_whole_head)
    return summary.to_dict()
