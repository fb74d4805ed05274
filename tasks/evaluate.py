"""Prefect task of the evaluate flow: a thin wrapper around rankcore.report.evaluate_model.

Not retried: evaluation is deterministic and writes its report folder atomically, so a
failure leaves the earlier report (if any) in place and the same command can simply be run
again.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import tasks._logs  # noqa: F401  (rankcore's log level)
from rankcore.report.evaluate import evaluate_model


@task(name="evaluate-model", retries=0, cache_policy=NO_CACHE)
def evaluate_task(model_dir: str, cache: str, out: str, split: str, n_boot: int, seed: int,
                  level: float, batch_size: int | None, device: str,
                  store_bias: bool, allow_incomplete_cache: bool = False,
                  engine: str = "local", workers: int = 1) -> dict[str, Any]:
    """Predict the split once per subject, score it, write REPORT_DIR; return a JSON-able dict.

    With ``engine`` "ray" the forward passes run as ``workers`` Ray tasks that read their own
    rows (rankcore.inference.engine); this task reads no volume for them.

    Keys: out_dir, files (name -> path), metrics (metrics.json), summary_markdown, warnings.
    """
    ev = evaluate_model(model_dir, cache, out, split=split, n_boot=n_boot, seed=seed,
                        level=level, batch_size=batch_size, device=device,
                        store_bias=store_bias, allow_incomplete_cache=allow_incomplete_cache,
                        engine=engine, workers=workers)
    return {"out_dir": str(ev.out_dir), "files": ev.files, "metrics": ev.metrics,
            "summary_markdown": ev.summary_markdown, "warnings": list(ev.warnings)}
