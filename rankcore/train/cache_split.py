"""Subjects named by cache rows, opened where they are used (a Ray worker, a Ray task).

A :class:`CacheSplit` is a few strings and numbers: the cache root, the preprocessing config,
the subject keys (and stage-1 estimates). It travels to Ray workers instead of the volumes,
and each worker opens the Parquet cache itself (:class:`rankcore.cache.VolumeDataset`) and
reads only the rows it uses, one row group per subject, when a batch needs them
(``preload=False``): the memory of the process that ships it does not grow with the cohort,
and a worker holds one batch of volumes plus per-subject metadata and histogram counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.train.data import SubjectData

__all__ = ["CacheSplit", "KeyedRows"]


@dataclass(frozen=True)
class CacheSplit:
    """Data named by a cache split or by keys, read where it is loaded.

    Attributes:
        cache_dir: the cache root (a path every process that loads it sees).
        split: a split name (or names), or None for every row.
        stage1: stage-1 estimates by subject key (stage 2's input), or None.
        preload: load the volumes into memory once per process (float16); False reads each
            batch's rows when it is needed (bounded memory).
        keys: subject keys to keep, in this order (None: every row of ``split``); only these
            rows are read.
        preprocess: the PreprocessConfig (as a dict) choosing the cache folder when the cache
            holds several; None: its only one.
    """

    cache_dir: str
    split: str | tuple[str, ...] | None = None
    stage1: dict[str, float] | None = None
    preload: bool = True
    keys: tuple[str, ...] | None = None
    preprocess: dict[str, Any] | None = None

    def dataset(self) -> Any:
        """The VolumeDataset of these rows (metadata only; volumes are read on use)."""
        from rankcore.cache import VolumeDataset
        from rankcore.mri.types import PreprocessConfig

        config = None
        if self.preprocess is not None:
            d = {k: v for k, v in self.preprocess.items() if k != "digest"}
            d["shape"] = tuple(d["shape"])
            config = PreprocessConfig(**d)
        split = list(self.split) if isinstance(self.split, tuple) else self.split
        dataset: Any = VolumeDataset(self.cache_dir, config, split=split)
        return dataset if self.keys is None else KeyedRows(dataset, self.keys)

    def load(self, preload: bool | None = None) -> SubjectData:
        """Open the rows (``preload`` overrides the attribute; False reads no volume here).

        Raises:
            InputError: a key of ``keys`` is not in the split, or ``stage1`` lacks a subject.
        """
        data = SubjectData.from_dataset(self.dataset(),
                                        preload=self.preload if preload is None else preload)
        if self.stage1 is not None:
            missing = [k for k in data.participant_ids if k not in self.stage1]
            if missing:
                raise InputError(f"`stage1` must hold an estimate for every subject, got none "
                                 f"for {len(missing)} subject(s), e.g. {missing[:3]}")
            data = data.with_stage1([self.stage1[k] for k in data.participant_ids])
        return data

    def chunks(self, size: int) -> list[CacheSplit]:
        """These rows cut into consecutive CacheSplits of at most ``size`` keys (in order)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"`size` must be a positive integer, got {size!r}")
        keys = self.keys if self.keys is not None else tuple(self.dataset().keys)
        out = []
        for start in range(0, len(keys), size):
            part = keys[start:start + size]
            s1 = None if self.stage1 is None else {k: self.stage1[k] for k in part}
            out.append(CacheSplit(self.cache_dir, self.split, s1, self.preload, part,
                                  self.preprocess))
        return out


class KeyedRows:
    """The rows of a VolumeDataset named by ``keys``, in that order (reads only those).

    Offers the dataset's interface (``keys``, ``ages``, ``sexes``, ``sites``, ``volume(i)``,
    and ``channels(i)`` / ``channel_names`` / ``features`` / ``feature_names`` when the
    dataset has them), so :meth:`SubjectData.from_dataset` takes it as it is.
    """

    def __init__(self, dataset: Any, keys: tuple[str, ...]):
        where = {k: i for i, k in enumerate(dataset.keys)}
        missing = [k for k in keys if k not in where]
        if missing:
            raise InputError(f"`keys` must name rows of the cache split, got {len(missing)} "
                             f"unknown key(s), e.g. {missing[:3]}")
        if len(set(keys)) != len(keys):
            raise InputError("`keys` must be unique")
        self._dataset, self._rows = dataset, [where[k] for k in keys]
        self.keys = list(keys)
        self.ages = np.asarray(dataset.ages)[self._rows]
        self.sexes = [dataset.sexes[i] for i in self._rows]
        self.sites = [dataset.sites[i] for i in self._rows]
        feats = getattr(dataset, "features", None)
        if feats is not None and not callable(feats):
            self.features = np.asarray(feats)[self._rows]
            self.feature_names = getattr(dataset, "feature_names", None)
        if hasattr(dataset, "channel_names"):
            self.channel_names = dataset.channel_names

    def __len__(self) -> int:
        return len(self._rows)

    def volume(self, i: int) -> Any:
        return self._dataset.volume(self._rows[i])

    def __getattr__(self, name: str) -> Any:
        if name == "channels" and hasattr(self._dataset, "channels"):
            return lambda i: self._dataset.channels(self._rows[i])
        raise AttributeError(name)
