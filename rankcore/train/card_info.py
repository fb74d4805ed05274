"""What a shareable model card says about its data and use, and where per-subject records go.

A model folder is meant to be shared, so it holds no participant id: the per-subject training
records (the training / validation / fold assignment, every job's predictions, the
out-of-fold estimates) go to the sibling folder ``MODEL_DIR.records`` (:func:`records_dir`),
which stays with the data. The card instead describes the training population in aggregate
(:func:`population`: age range, sex and site mix) and states the intended use
(:data:`INTENDED_USE`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INTENDED_USE", "RECORDS_SUFFIX", "SPLIT_RECORD", "STAGE_IDS", "cache_population",
           "card_interval", "move_records", "population", "read_split_record", "records_dir"]

RECORDS_SUFFIX = ".records"
#: File of the records folder with the training / validation keys and folds.
SPLIT_RECORD = "split.json"
#: File of the records folder, per stage, with the ids a stage card listed (train_ids, val_ids).
STAGE_IDS = "ids.json"
#: File names that carry per-subject rows (moved out of the model folder).
_PER_SUBJECT = ("predictions.csv", "heldout.csv", "oof.csv")
#: Fields of a stage card that list ids (moved to the records folder).
_ID_FIELDS = ("train_ids", "val_ids")

INTENDED_USE = (
    "Research use only: estimates of brain age (years) and of the brain-age gap from "
    "T1-weighted MRI, for group-level analyses of cohorts like the training population "
    "(see `training_population`: age range, sex and site mix). Inputs must be preprocessed "
    "by brainrank with this card's `preprocess` settings. Errors grow outside the training age "
    "range, on sites not seen in training and on images prepared differently (e.g. not "
    "skull-stripped). Not a medical device: not for diagnosis or for decisions about an "
    "individual.")


def records_dir(model_dir: str | os.PathLike) -> Path:
    """The records folder of ``model_dir``: ``MODEL_DIR.records`` next to it."""
    model_dir = Path(model_dir)
    return model_dir.parent / f"{model_dir.name}{RECORDS_SUFFIX}"


def population(keys: Sequence[str], ages: Sequence[float], sexes: Sequence[str | None],
               sites: Sequence[str | None]) -> dict[str, Any]:
    """Aggregate description of the subjects that trained (or validated) a model.

    Args:
        keys: one per subject (only counted).
        ages: years (NaN for unknown).
        sexes, sites: labels (None for unknown, counted as ``"n/a"``).

    Returns:
        ``n``, ``age_min``, ``age_max``, ``age_mean``, ``age_sd`` (years, over known ages),
        ``sex`` and ``site`` (label -> count, sorted by label).
    """
    a = np.asarray(ages, dtype=np.float64)
    a = a[np.isfinite(a)]
    stats = ({"age_min": float(a.min()), "age_max": float(a.max()), "age_mean": float(a.mean()),
              "age_sd": float(a.std())} if len(a) else
             {"age_min": None, "age_max": None, "age_mean": None, "age_sd": None})

    def mix(labels: Sequence[str | None]) -> dict[str, int]:
        return dict(sorted(Counter("n/a" if v is None else str(v) for v in labels).items()))

    return {"n": len(keys), **stats, "sex": mix(sexes), "site": mix(sites)}


def cache_population(cache_dir: str, preprocess: dict[str, Any], keys: Sequence[str]
                     ) -> dict[str, Any]:
    """:func:`population` of the cached rows ``keys`` (the training and validation keys)."""
    from rankcore.cache import open_cache
    from rankcore.mri.types import PreprocessConfig

    config = PreprocessConfig(**dict(preprocess, shape=tuple(preprocess["shape"])))
    table = open_cache(cache_dir, config).table
    row = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    used = [row[k] for k in keys]
    col = {c: table.column(c).to_pylist() for c in ("age", "sex", "site")}
    return population(used, [np.nan if col["age"][i] is None else col["age"][i] for i in used],
                      [col["sex"][i] for i in used], [col["site"][i] for i in used])


def card_interval(val_pred: Any, val_ages: Any, train_pred: Any, train_ages: Any
                  ) -> dict[str, Any] | None:
    """The split-conformal interval of a cascade's estimates for its card: calibrated on the
    validation subjects, its scale's slope fitted on the training residuals; None with fewer
    than 2 validation ages."""
    from rankcore.conformal import INTERVAL_LEVEL, fit_conformal

    if np.isfinite(np.asarray(val_ages, dtype=np.float64)).sum() < 2:
        return None
    return fit_conformal(val_pred, val_ages, scale_pred=train_pred, scale_ages=train_ages,
                         level=INTERVAL_LEVEL).to_dict()


def move_records(staging: Path, records: Path, split: dict[str, Any],
                 folds: Sequence[int], training_key: str) -> None:
    """Move every per-subject file of ``staging`` into ``records`` (same relative paths), move
    the id lists of every stage card to ``records/<stage>/ids.json``, and write the split
    record (keys of training, validation and folds)."""
    if records.exists():
        shutil.rmtree(records)
    records.mkdir(parents=True)
    moved = [path for path in sorted(staging.rglob("*.csv")) if path.name in _PER_SUBJECT]
    for path in moved:  # copies first: a crash in between leaves the staging folder whole
        target = records / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    blob = {"training_key": training_key, "train": list(split["train"]),
            "val": list(split["val"]), "folds": dict(zip(split["train"], map(int, folds)))}
    (records / SPLIT_RECORD).write_text(json.dumps(blob, indent=2) + "\n")
    stage_cards = {}
    for path in sorted(staging.glob("**/card.json")):
        if path.parent == staging:
            continue  # the cascade card: built without ids
        card = json.loads(path.read_text())
        ids = {k: card.pop(k) for k in _ID_FIELDS if k in card}
        if ids:
            target = records / path.parent.relative_to(staging) / STAGE_IDS
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(ids, indent=2) + "\n")
            stage_cards[path] = card
    for path in moved:
        path.unlink()
    for path, card in stage_cards.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=True) + "\n")
        os.replace(tmp, path)


def read_split_record(model_dir: str | os.PathLike, card: dict[str, Any]) -> dict[str, Any]:
    """The split record of ``model_dir``'s training (``train``, ``val``, ``folds``), or ``{}``
    when the records folder is absent or belongs to another training key."""
    path = records_dir(model_dir) / SPLIT_RECORD
    try:
        blob = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return blob if blob.get("training_key") == card.get("training_key") else {}
