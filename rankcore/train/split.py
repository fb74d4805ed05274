"""Which cached subjects train the cascade and which validate it, and the cache's data digest.

The cache's ``split`` column decides when it says something: rows labelled ``"train"`` train,
rows labelled ``"val"`` (or ``"validation"``) validate, rows without a label join the training
pool, and rows with any other label (``"test"``, ...) are never touched by training. When no
row is labelled ``"test"`` and a ``test_fraction`` is asked for, the test split is held out of
the unlabelled rows exactly as the pipeline holds it out of a cohort table
(:func:`rankcore.mri.holdout.held_out_participants`: a stable hash of the split seed and the
participant id), and :func:`held_out_test_rows` finds the same rows again at evaluation. When
no row is labelled ``"val"``, a validation set is carved out of the training pool by
:func:`stratified_split` (seeded, stratified by site and age). Rows without an age cannot be
trained on and are left out (counted in :attr:`TrainingSplit.excluded`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.mri.holdout import held_out_participants

__all__ = ["TrainingSplit", "cache_data_digest", "held_out_test_rows", "stratified_split",
           "training_split"]

TRAIN_LABELS = ("train",)
VAL_LABELS = ("val", "validation")
TEST_LABEL = "test"
#: Value of the ``test.source`` record when the test split was held out by the stable hash.
HELD_OUT = "held_out"

#: Metadata columns whose values define a cache's training data (the data digest covers them).
DIGEST_COLUMNS = ("key", "age", "sex", "site", "split", "source_digest", "preproc_digest")


def stratified_split(ages: Any, sites: Sequence[str], val_fraction: float, seed: int
                     ) -> np.ndarray:
    """Seeded validation mask (N,) bool, stratified by site and age.

    Within each site, subjects are sorted by age and cut into consecutive groups of
    m = round(1 / val_fraction); one member of each full group (chosen at random) goes to
    validation, and the last, partial group contributes one with probability size / m. Each
    site thus gives about ``val_fraction`` of its subjects, spread over its age range. At
    least two subjects are set aside (SRCC needs two) when N >= 4 and ``val_fraction > 0``.

    Args:
        ages: (N,) years.
        sites: N site labels.
        val_fraction: in [0, 0.5].
        seed: seeds the choices.

    Raises:
        InputError: ``val_fraction`` out of range or ``sites`` of another length.
    """
    ages = np.asarray(ages, dtype=np.float64)
    sites_arr = np.asarray([str(s) for s in sites])
    if sites_arr.shape != ages.shape:
        raise InputError(f"`sites` must have {len(ages)} values, got {len(sites_arr)}")
    if isinstance(val_fraction, bool) or not 0.0 <= float(val_fraction) <= 0.5:
        raise InputError(f"`val_fraction` must be a number in [0, 0.5], got {val_fraction!r}")
    is_val = np.zeros(len(ages), dtype=bool)
    if val_fraction == 0 or len(ages) == 0:
        return is_val
    rng = np.random.default_rng(seed)
    m = max(2, round(1.0 / float(val_fraction)))
    for site in sorted(set(sites_arr.tolist())):
        idx = np.flatnonzero(sites_arr == site)
        idx = idx[np.argsort(ages[idx], kind="stable")]
        for start in range(0, len(idx), m):
            group = idx[start:start + m]
            if len(group) == m or rng.random() < len(group) / m:
                is_val[rng.choice(group)] = True
    short = 2 - int(is_val.sum())
    if short > 0 and len(ages) >= 4:
        is_val[rng.choice(np.flatnonzero(~is_val), size=short, replace=False)] = True
    return is_val


@dataclass(frozen=True)
class TrainingSplit:
    """The subjects (cache keys) that train and validate the cascade.

    Attributes:
        train: keys of the training subjects (sorted).
        val: keys of the validation subjects (sorted; empty without validation).
        source: ``"cache"`` (train and val both from the split column), ``"cache+stratified"``
            (train rows from the column, val carved out of them) or ``"stratified"`` (no labels).
        val_fraction: fraction carved out when the cache has no validation rows.
        seed: seed of the carving.
        excluded: rows left out, by reason (``"split:test"``, ``"no_age"``, ...).
        test: how the test split was made, without ids: ``source`` (``"cache"``: rows
            labelled ``test``; ``"held_out"``: held out here by the stable hash, with
            ``fraction`` and ``seed``; ``"none"``: no test split) and ``n`` (rows).
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    source: str
    val_fraction: float
    seed: int
    excluded: dict[str, int] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=lambda: {"source": "none", "n": 0})

    def to_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val), "source": self.source,
                "val_fraction": self.val_fraction, "seed": self.seed,
                "excluded": dict(self.excluded), "test": dict(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingSplit:
        return cls(tuple(d["train"]), tuple(d["val"]), str(d["source"]),
                   float(d["val_fraction"]), int(d["seed"]), dict(d.get("excluded", {})),
                   dict(d.get("test", {"source": "none", "n": 0})))


def held_out_test_rows(participant_ids: Sequence[str], ages: Any,
                       splits: Sequence[str | None], fraction: float, seed: int) -> np.ndarray:
    """Rows (N,) bool that :func:`training_split` held out as ``test`` with these settings.

    The pool is the unlabelled rows with an age; a participant drawn by
    :func:`rankcore.mri.holdout.held_out_participants` takes all its pooled rows with it.

    Raises:
        InputError: ``fraction`` outside (0, 0.5].
    """
    ages = np.asarray(ages, dtype=np.float64)
    pooled = np.array([s is None and bool(np.isfinite(a)) for s, a in zip(splits, ages)],
                      dtype=bool)
    held = held_out_participants([p for p, ok in zip(participant_ids, pooled) if ok],
                                 fraction, seed)
    return pooled & np.array([p in held for p in participant_ids], dtype=bool)


def training_split(keys: Sequence[str], ages: Any, sites: Sequence[str | None],
                   splits: Sequence[str | None], *, val_fraction: float, seed: int,
                   where: str = "the cache", participant_ids: Sequence[str] | None = None,
                   test_fraction: float = 0.0, split_seed: int = 0) -> TrainingSplit:
    """Decide the training and validation subjects of a cache (see the module docstring).

    Args:
        keys, ages, sites, splits: one value per cached row (ages NaN / sites None if unknown).
        val_fraction: fraction of the training pool carved out for validation when no row is
            labelled ``"val"`` (0: no validation).
        seed: seeds the carving.
        where: how messages name the data.
        participant_ids: one per row (sessions of one participant share it); None: the keys.
        test_fraction: share of the unlabelled participants held out as ``test`` when no row
            is labelled ``test``, in [0, 0.5] (0: none; everything else trains).
        split_seed: seeds that hold-out (the pipeline's ``split_seed``).

    Raises:
        InputError: no rows, no row usable for training has an age, or ``test_fraction`` out
            of range.
    """
    n = len(keys)
    if n == 0:
        raise InputError(f"{where} holds no subjects (an empty cohort, or every subject was "
                         "quarantined at ingest): there is nothing to train on")
    if isinstance(test_fraction, bool) or not 0.0 <= float(test_fraction) <= 0.5:
        raise InputError(f"`test_fraction` must be a number in [0, 0.5], got {test_fraction!r}")
    ages = np.asarray(ages, dtype=np.float64)
    labels = [None if s is None else str(s) for s in splits]
    pids = list(keys) if participant_ids is None else [str(p) for p in participant_ids]
    n_labelled_test = labels.count(TEST_LABEL)
    test: dict[str, Any] = {"source": "cache" if n_labelled_test else "none",
                            "n": n_labelled_test}
    if not n_labelled_test and test_fraction > 0:
        held = held_out_test_rows(pids, ages, labels, float(test_fraction), int(split_seed))
        labels = [TEST_LABEL if h else label for h, label in zip(held, labels)]
        test = {"source": HELD_OUT, "fraction": float(test_fraction), "seed": int(split_seed),
                "n": int(held.sum()),
                "participants": len({p for p, h in zip(pids, held) if h})}
    excluded: Counter[str] = Counter()
    train_idx, val_idx, pool_idx = [], [], []
    n_outside_test = 0
    for i, label in enumerate(labels):
        if label is not None and label not in TRAIN_LABELS + VAL_LABELS:
            excluded[f"split:{label}"] += 1
            continue
        n_outside_test += 1
        if not np.isfinite(ages[i]):
            excluded["no_age"] += 1
        elif label in VAL_LABELS:
            val_idx.append(i)
        elif label in TRAIN_LABELS:
            train_idx.append(i)
        else:
            pool_idx.append(i)
    if not (train_idx or val_idx or pool_idx):
        if n_outside_test == 0:
            hint = (": train with a lower `test_fraction` (--test-fraction)"
                    if test["source"] == HELD_OUT else "")
            raise InputError(f"{where} has no training subjects: all {n} rows belong to other "
                             f"splits ({', '.join(sorted(excluded))}){hint}")
        raise InputError(f"{where} has no ages: none of its {n_outside_test} training "
                         "subject(s) has an age; ingest a cohort whose table gives ages")
    train = sorted(train_idx + pool_idx)
    if val_idx:
        source = "cache"
    else:
        source = "cache+stratified" if train_idx else "stratified"
        site_labels = ["n/a" if sites[i] is None else str(sites[i]) for i in train]
        is_val = stratified_split(ages[train], site_labels, val_fraction, seed)
        val_idx = [i for i, v in zip(train, is_val) if v]
        train = [i for i, v in zip(train, is_val) if not v]
    return TrainingSplit(tuple(sorted(keys[i] for i in train)),
                         tuple(sorted(keys[i] for i in val_idx)), source, float(val_fraction),
                         int(seed), dict(sorted(excluded.items())), test)


def cache_data_digest(preproc_digest: str, columns: dict[str, Sequence[Any]]) -> str:
    """sha256 over the preprocessing digest and, row by row, the :data:`DIGEST_COLUMNS`.

    Identifies the training data independently of how the cache's shards are laid out: a
    relabelled age, a changed source file or another preprocessing config changes it.

    Args:
        preproc_digest: the cache's PreprocessConfig digest.
        columns: column name -> values (every name of DIGEST_COLUMNS, equal lengths).
    """
    h = hashlib.sha256(f"brainrank-data/1|{preproc_digest}\n".encode())
    n = len(columns["key"])
    for i in range(n):
        row = [columns[c][i] for c in DIGEST_COLUMNS]
        row = [None if isinstance(v, float) and not np.isfinite(v) else v for v in row]
        h.update(json.dumps(row, default=str).encode() + b"\n")
    return h.hexdigest()
