"""A torch Dataset over the cache: metadata in memory, volumes read lazily from memory maps.

Construction reads only the metadata columns (the tissue features included). Each item
reads one row group of one shard through ``pyarrow.memory_map`` (the OS pages the bytes
in; nothing is loaded ahead), decodes the stored float16/float32 bytes (and uint8 tissue
probabilities) with ``np.frombuffer`` and returns a float32 tensor. Shard handles are
opened per process on first use, so the dataset pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from rankcore.cache.reader import CacheView, open_cache
from rankcore.cache.shards import open_shard
from rankcore.mri.tissue_names import CLASSES, TISSUE_FEATURES
from rankcore.mri.types import PreprocessConfig

MISSING = "n/a"  # what a missing sex / site becomes (BIDS spelling), so batches collate


class VolumeDataset(Dataset):
    """Subject-sessions of a cache as ``{"image", "age", "sex", "site", "participant_id", "key"}``.

    Items:
        image: float32 tensor (C, X, Y, Z), RAS: :meth:`channels` (C = 4 with tissue,
            1 without).
        age: float32 0-d tensor, years (NaN when unknown).
        sex, site: str (``"n/a"`` when unknown).
        participant_id, key: str.

    Args:
        cache_dir: the cache root given to ingest.
        config: which preprocessing config's cache (None: the only one).
        split: keep only rows of this split (or these splits).
        verify: check every shard's checksum when opening (reads all bytes once).
    """

    def __init__(self, cache_dir: str | Path, config: PreprocessConfig | None = None, *,
                 split: str | Sequence[str] | None = None, verify: bool = False):
        self.view: CacheView = open_cache(cache_dir, config, verify=verify).select(split)
        t = self.view.table
        self.keys: list[str] = t.column("key").to_pylist()
        self.participant_ids: list[str] = t.column("participant_id").to_pylist()
        self.ages = np.asarray(t.column("age").to_numpy(zero_copy_only=False),
                               dtype=np.float32)
        self.sexes = [MISSING if v is None else v for v in t.column("sex").to_pylist()]
        self.sites = [MISSING if v is None else v for v in t.column("site").to_pylist()]
        self._files: dict[str, pq.ParquetFile] = {}
        self._pid = os.getpid()
        self.features: np.ndarray = self.view.tissue_features()
        """(N, F) float64 tissue features, NaN where missing (F = 0 without tissue)."""
        self.feature_names: tuple[str, ...] = TISSUE_FEATURES if self.view.has_tissue else ()
        """Names of the columns of :attr:`features` (rankcore.mri.tissue_names)."""
        self.channel_names: tuple[str, ...] = (
            ("t1", *CLASSES) if self.view.has_tissue else ("t1",))
        """Names of the channels of :meth:`channels`: ("t1", "gm", "wm", "csf") or ("t1",)."""

    def __len__(self) -> int:
        return len(self.keys)

    def _shard(self, name: str) -> pq.ParquetFile:
        if self._pid != os.getpid():  # forked into a DataLoader worker: reopen the maps
            self._files, self._pid = {}, os.getpid()
        pf = self._files.get(name)
        if pf is None:
            pf = self._files[name] = open_shard(self.view.layout.shard_path(name))
        return pf

    def volume(self, i: int) -> np.ndarray:
        """Stored volume of item ``i`` (float16 or float32, shape (X, Y, Z), read-only view)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        i %= len(self)
        return self.view.read_volume(i, self._shard(self.view.shards[i]))

    def channels(self, i: int) -> np.ndarray:
        """Item ``i``'s channels: (C, X, Y, Z), the stored volume's dtype (float16/float32).

        Channel 0 is :meth:`volume` (normalised intensity); with tissue, channels 1..3 are
        the GM, WM and CSF probabilities in [0, 1] (stored to 1/255). C ==
        ``len(channel_names)``.
        """
        vol = self.volume(i)
        if not self.view.has_tissue:
            return vol[None].copy()
        i %= len(self)
        tissue = self.view.read_tissue(i, self._shard(self.view.shards[i]))
        return np.concatenate([vol[None], tissue.astype(vol.dtype)], axis=0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not self.view.has_tissue:
            vol = self.volume(i)
            # The stored bytes are a read-only view of the page; copy them (1 byte/voxel
            # cheap in float16) and let torch widen them (faster than numpy's float16 cast).
            image = torch.from_numpy(vol.copy()).to(torch.float32).unsqueeze(0)
        else:
            image = torch.from_numpy(self.channels(i)).to(torch.float32)
        i %= len(self)
        return {
            "image": image,
            "age": torch.tensor(self.ages[i], dtype=torch.float32),
            "sex": self.sexes[i],
            "site": self.sites[i],
            "participant_id": self.participant_ids[i],
            "key": self.keys[i],
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # memory maps are per process
        return state
