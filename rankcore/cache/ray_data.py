"""The cache as a Ray Dataset (``ray.data.read_parquet`` over the accepted shards).

Ray is imported inside the functions, so importing rankcore.cache stays fast. Workers must
see the cache folder at the same path (a local disk on one machine, a shared file system or
an object-store URI mounted on a cluster).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.cache.layout import find_layout, read_manifest
from rankcore.cache.schema import decode_volume
from rankcore.cache.shards import verify_shard
from rankcore.errors import InputError
from rankcore.mri.types import PreprocessConfig


def read_ray_dataset(cache_dir: str | Path, config: PreprocessConfig | None = None, *,
                     split: str | None = None, columns: Sequence[str] | None = None,
                     **read_kwargs: Any):
    """A ``ray.data.Dataset`` with one row per cached subject-session.

    Args:
        cache_dir: the cache root given to ingest.
        config: which preprocessing config's cache (None: the only one).
        split: keep only rows of this split.
        columns: columns to read (default all, ``volume`` included); see
            ``volumes_from_batch`` to turn a batch's volume bytes into an array.
        **read_kwargs: passed to ``ray.data.read_parquet`` (e.g. ``override_num_blocks``).

    Raises:
        InputError: no cache, an empty cache, a corrupt shard, or an ingest left unfinished
            (a key in two shards; run ingest again to finish it).
    """
    import ray.data

    layout = find_layout(cache_dir, config)
    manifest = read_manifest(layout)
    if not manifest.shards:
        raise InputError(f"`cache_dir` {str(layout.folder)!r} must hold at least one cached "
                         f"subject, got an empty cache")
    for info in manifest.shards:
        problem = verify_shard(layout, info, full=False)
        if problem is not None:
            raise InputError(f"cache shard {info.name} is corrupt ({problem}); run "
                             f"`brainrank ingest` again to rebuild it")
    counts = Counter(k for s in manifest.shards for k in s.keys)
    if not manifest.complete and any(n > 1 for n in counts.values()):
        raise InputError(f"cache {str(layout.folder)!r} holds an unfinished ingest; run "
                         f"`brainrank ingest` again to finish it")
    paths = [str(layout.shard_path(s.name)) for s in manifest.shards]
    ds = ray.data.read_parquet(paths, **read_kwargs)
    if split is not None:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("split") == split)
    if columns is not None:
        ds = ds.select_columns(list(columns))  # pushed down into the Parquet read
    return ds


def volumes_from_batch(batch: dict[str, Any]) -> np.ndarray:
    """Decode a Ray batch's ``volume`` bytes into float32 (B, 1, X, Y, Z).

    ``batch`` needs the ``volume``, ``shape`` and ``volume_dtype`` columns (numpy format).
    """
    vols = [decode_volume(v, s, d).astype(np.float32)
            for v, s, d in zip(batch["volume"], batch["shape"], batch["volume_dtype"])]
    if not vols:
        raise InputError("`batch` must hold at least one row, got an empty batch")
    return np.stack(vols)[:, None]
