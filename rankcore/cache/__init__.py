"""Parquet feature cache: schema, atomic incremental ingest, readers (torch and Ray Data).

``VolumeDataset`` (torch) and ``read_ray_dataset`` / ``volumes_from_batch`` (Ray) are
imported on first use, so a worker that only ingests never imports torch or Ray.
"""

from __future__ import annotations

from typing import Any

from rankcore.cache.batch import Batch, BatchResult, SubjectOutcome, SubjectTask, process_batch
from rankcore.cache.engines import ENGINES, ensure_ray, run_batches
from rankcore.cache.ingest import (
    IngestSummary,
    commit_batch,
    execute_plan,
    finalize_ingest,
    ingest_cohort,
)
from rankcore.cache.layout import CacheLayout, Manifest, ShardInfo, cache_lock, find_layout
from rankcore.cache.plan import IngestPlan, plan_ingest
from rankcore.cache.reader import CacheView, check_complete, open_cache
from rankcore.cache.schema import (
    CACHE_SCHEMA,
    FEATURE_COLUMNS,
    METADATA_COLUMNS,
    QUARANTINE_SCHEMA,
    decode_volume,
)

_LAZY = {
    "VolumeDataset": "rankcore.cache.dataset",
    "read_ray_dataset": "rankcore.cache.ray_data",
    "volumes_from_batch": "rankcore.cache.ray_data",
}

__all__ = [
    "CACHE_SCHEMA",
    "ENGINES",
    "FEATURE_COLUMNS",
    "METADATA_COLUMNS",
    "QUARANTINE_SCHEMA",
    "Batch",
    "BatchResult",
    "CacheLayout",
    "CacheView",
    "IngestPlan",
    "IngestSummary",
    "Manifest",
    "ShardInfo",
    "SubjectOutcome",
    "SubjectTask",
    "VolumeDataset",
    "cache_lock",
    "check_complete",
    "commit_batch",
    "decode_volume",
    "ensure_ray",
    "execute_plan",
    "finalize_ingest",
    "find_layout",
    "ingest_cohort",
    "open_cache",
    "plan_ingest",
    "process_batch",
    "read_ray_dataset",
    "run_batches",
    "volumes_from_batch",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankcore.cache' has no attribute {name!r}")
