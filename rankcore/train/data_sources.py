"""Where :class:`rankcore.train.data.SubjectData` gets its images: an in-memory tensor or a
dataset read per batch, each with a memo of the histogram-branch counts of its images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from rankcore.errors import ShapeError

__all__ = ["DatasetSource", "HistogramMemo", "TensorSource", "read_channels"]


class HistogramMemo:
    """Histogram-branch counts of a source's images, per histogram configuration."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Any, ...], tuple[torch.Tensor, np.ndarray]] = {}

    # Each process keeps its own: a copy sent to a Ray worker starts empty (arrays unpickled
    # from Ray's object store are read-only, and the counts are cheap to redo once).
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._counts = {}

    def get(self, backbone: nn.Module, n_source: int, rows: np.ndarray,
            images: torch.Tensor) -> torch.Tensor:
        """Counts (b, bins) of the images at source ``rows`` (``images``, in that order),
        computing only those not seen before."""
        key = backbone.histogram_key()
        if key not in self._counts:
            self._counts[key] = (torch.zeros(n_source, backbone.histogram.bins),
                                 np.zeros(n_source, dtype=bool))
        counts, done = self._counts[key]
        todo = np.flatnonzero(~done[rows])
        if len(todo):
            fresh = backbone.histogram_counts(images[torch.from_numpy(todo).to(images.device)])
            counts[torch.from_numpy(rows[todo])] = fresh.float().cpu()
            done[rows[todo]] = True
        return counts[torch.from_numpy(rows)].to(images.device)


class TensorSource:
    """Images held in one (N, C, X, Y, Z) tensor (any float dtype; float32 on the way out)."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.histograms = HistogramMemo()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def get(self, rows: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(rows)].float()


def read_channels(dataset: Any, i: int) -> np.ndarray:
    """(C, X, Y, Z) image of subject ``i``: ``channels(i)`` when the dataset has it, else
    ``volume(i)`` as one channel."""
    if hasattr(dataset, "channels"):
        arr = np.asarray(dataset.channels(i))
        if arr.ndim != 4:
            raise ShapeError(f"`channels({i})` must have shape (C, X, Y, Z), got {arr.shape}")
        return arr
    return np.asarray(dataset.volume(i))[None]


class DatasetSource:
    """Images read per batch from a dataset with ``channels(i) -> (C, X, Y, Z)`` or
    ``volume(i) -> (X, Y, Z)`` arrays."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self._first: tuple[int, ...] | None = None
        self.histograms = HistogramMemo()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, int, int]:
        if self._first is None:
            self._first = tuple(read_channels(self.dataset, 0).shape)
        return self._first[1:]

    @property
    def channels(self) -> int:
        self.shape  # noqa: B018 - reads the first subject once
        return self._first[0]

    def get(self, rows: np.ndarray) -> torch.Tensor:
        vols = [np.asarray(read_channels(self.dataset, int(i)), dtype=np.float32)
                for i in rows]
        return torch.from_numpy(np.stack(vols))
