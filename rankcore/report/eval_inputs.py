"""The cache an evaluation reads: the model's view of it, the rows of a split, its subjects.

Everything here reads metadata columns only (participant ids, ages, splits, tissue
features); volumes are read later, batch by batch, by whoever predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.inference.model import describe_config

__all__ = ["ALL_SPLITS", "data_digest", "open_model_cache", "read_subjects", "split_rows"]

#: ``split`` value that evaluates every row of the cache.
ALL_SPLITS = "all"


def open_model_cache(cache_dir: str | Path, config: Any) -> Any:
    """The cache view of the model's preprocessing config, or a mismatch error."""
    from rankcore.cache import open_cache
    from rankcore.cache.layout import CacheLayout, read_config

    if CacheLayout.for_config(Path(cache_dir), config).manifest_path.is_file():
        return open_cache(cache_dir, config)  # the model's config is there: its own errors
    try:
        return open_cache(cache_dir, config)
    except InputError:
        found = []
        for manifest in sorted(Path(cache_dir).glob("*/manifest.json")):
            try:
                found.append(describe_config(read_config(CacheLayout(Path(cache_dir),
                                                                     manifest.parent.name))))
            except InputError:
                continue
        if not found:
            raise
        raise InputError(f"model/cohort mismatch: the model was trained on volumes at "
                         f"{describe_config(config)}, but cache {str(cache_dir)!r} holds "
                         f"{'; '.join(found)}: run `brainrank ingest COHORT --cache "
                         f"{cache_dir} --spacing {config.spacing:g} --shape "
                         f"{' '.join(map(str, config.shape))}` first") from None


def data_digest(view: Any) -> str:
    from rankcore.train.split import DIGEST_COLUMNS, cache_data_digest

    columns = {c: view.table.column(c).to_pylist() for c in DIGEST_COLUMNS}
    return cache_data_digest(view.layout.digest, columns)


def read_subjects(cache_dir: str | Path, config: Any) -> Any:
    """All rows of the model's cache as a lazily read SubjectData (volumes read per batch)."""
    from rankcore.cache import VolumeDataset
    from rankcore.train.data import SubjectData

    ds = VolumeDataset(cache_dir, config)
    data = SubjectData.from_dataset(ds, preload=False)
    # The dataset's ages are float32 (training tensors); reports keep the table's float64.
    data.ages = np.asarray(ds.view.table.column("age").to_numpy(zero_copy_only=False),
                           dtype=np.float64)
    return data


def split_rows(view: Any, card: dict[str, Any], split: str, cache_dir: str) -> np.ndarray:
    """Rows of ``split``: its label, or the test split the model's training held out by hash."""
    from rankcore.train.split import HELD_OUT, held_out_test_rows

    labels = view.table.column("split").to_pylist()
    test = card.get("split", {}).get("test", {})
    if split == ALL_SPLITS:
        rows = np.arange(len(view))
    elif split in view.splits:
        rows = np.flatnonzero(np.asarray([s == split for s in labels]))
    elif split == "test" and test.get("source") == HELD_OUT:
        ages = view.table.column("age").to_numpy(zero_copy_only=False).astype(np.float64)
        rows = np.flatnonzero(held_out_test_rows(
            view.table.column("participant_id").to_pylist(), ages, labels,
            float(test["fraction"]), int(test["seed"])))
    else:
        why = ("" if split != "test" else ": the model holds out no test split of its own "
               "(trained with --test-fraction 0, or by an older brainrank); retrain with "
               "`brainrank train CACHE_DIR --out MODEL_DIR` (it holds out 20 % by default), "
               "label a test split in the cohort's `split` column, or pass --split all to "
               "score every cached subject (in-sample for the training subjects)")
        raise InputError(f"`split` must be one of {[*view.splits, ALL_SPLITS]} for cache "
                         f"{cache_dir!r}, got {split!r}{why}")
    if len(rows) == 0:
        raise InputError(f"cache {cache_dir!r} has no subjects in split {split!r}")
    return rows
