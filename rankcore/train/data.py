"""What the training loop reads: subjects with images, ages, sex codes, ids and tabular
features, in one class.

:class:`SubjectData` holds the per-subject metadata in memory and gets images from a source:

* in-memory tensors (:meth:`SubjectData.from_tensors`): tests, benchmarks, small cohorts;
* the Parquet cache's ``VolumeDataset`` (:meth:`SubjectData.from_dataset`): either loaded once
  into memory as float16 (``preload=True``, default: 300 subjects at (80, 96, 80) take 370 MB
  per channel, and every epoch then costs no I/O) or read lazily per batch (``preload=False``).

Images have C channels: channel 0 is the intensity, then any tissue probability maps the cache
holds (``channels(i)`` of the dataset; a dataset with only ``volume(i)`` gives C = 1). Tabular
features (N, F) (tissue volumes, regional fractions; NaN where missing) travel with the
subjects and reach the model in every batch.

``subset`` and ``with_stage1`` return new views without copying images, which is how the
cross-fitting folds and stage 2's inputs are made. Sex is coded +1 (M), -1 (F), 0 (unknown).

A model's histogram-branch counts (:meth:`rankcore.models.backbone.ScaleDense.histogram_counts`)
depend only on the image, are gradient-free and do not change under the left-right flip of
the augmentation, so :meth:`SubjectData.batch` computes them once per subject and keeps them
with the images (shared by every view): the cross-fitting folds, stage 2 and every epoch
reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rankcore.errors import InputError, ShapeError
from rankcore.train.data_sources import DatasetSource, TensorSource, read_channels

__all__ = ["SubjectData", "as_subject_data", "dataset_features", "encode_sex",
           "stratified_folds"]

_SEX_CODES = {"M": 1.0, "F": -1.0}


def encode_sex(values: Any, n: int) -> np.ndarray:
    """Sex as float32 codes (n,): +1 male, -1 female, 0 unknown.

    Accepts None (all unknown), strings ("M"/"F", anything else is unknown) or numbers already
    coded (must be in {-1, 0, 1}).
    """
    if values is None:
        return np.zeros(n, dtype=np.float32)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = list(values) if not isinstance(values, np.ndarray) else values
    if len(values) != n:
        raise ShapeError(f"`sex` must have {n} values (one per subject), got {len(values)}")
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        codes = values.astype(np.float32)
    else:
        codes = np.array([_SEX_CODES.get(str(v).upper(), 0.0) if isinstance(v, str)
                          else (0.0 if v is None else float(v)) for v in values],
                         dtype=np.float32)
    bad = ~np.isin(codes, (-1.0, 0.0, 1.0))
    if bad.any():
        raise InputError(f"`sex` codes must be +1 (male), -1 (female) or 0 (unknown), got "
                         f"{sorted(set(codes[bad].tolist()))[:5]}")
    return codes


class SubjectData:
    """Subjects for training or prediction (use the ``from_*`` constructors).

    Attributes:
        ages: float64 (N,) years (NaN where unknown).
        sex: float32 (N,) codes (+1 M, -1 F, 0 unknown).
        participant_ids: the N subject keys (``participant_id`` or ``participant_id/session``).
        sites: the N site labels ("n/a" when unknown).
        stage1: float64 (N,) stage-1 estimates in years (stage 2's input), or None.
        features: float64 (N, F) tabular features (NaN where missing; F = 0 when none).
        feature_names: the F feature names.
        channel_names: the C image channel names (channel 0 the intensity).
        shape: image grid (X, Y, Z).
        channels: C, the image channels.
    """

    def __init__(self, source: TensorSource | DatasetSource, rows: np.ndarray,
                 ages: np.ndarray, sex: np.ndarray, participant_ids: Sequence[str],
                 sites: Sequence[str], stage1: np.ndarray | None = None,
                 features: np.ndarray | None = None, feature_names: Sequence[str] = (),
                 channel_names: Sequence[str] | None = None):
        self._source = source
        self._rows = rows
        self.ages = ages
        self.sex = sex
        self.participant_ids = tuple(participant_ids)
        self.sites = tuple(sites)
        self.stage1 = stage1
        self.features = (np.zeros((len(rows), 0)) if features is None else features)
        self.feature_names = tuple(feature_names)
        self.channel_names = (("intensity",) if channel_names is None
                              else tuple(channel_names))

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, images: Any, ages: Any, *, sex: Any = None,
                     participant_ids: Sequence[str] | None = None,
                     sites: Sequence[str] | None = None,
                     stage1: Any = None, features: Any = None,
                     feature_names: Sequence[str] | None = None,
                     channel_names: Sequence[str] | None = None) -> SubjectData:
        """Subjects from in-memory images (N, X, Y, Z) or (N, C, X, Y, Z) and ages (N,).

        Args:
            images: the images; a 4-D array is one channel.
            ages: years (NaN where unknown).
            sex, participant_ids, sites, stage1: per-subject metadata (see the attributes).
            features: tabular features (N, F) (NaN where missing), or None (F = 0).
            feature_names: their F names (default ``feature-0`` …).
            channel_names: the C channel names (default ``intensity``, ``channel-1`` …).

        Raises:
            ShapeError: wrong image dims, or metadata of another length than the images.
            InputError: non-finite voxels, non-unique ids or names, infinite features.
        """
        images = torch.as_tensor(images)
        if images.ndim == 4:
            images = images[:, None]
        if images.ndim != 5 or images.shape[1] < 1:
            raise ShapeError(f"`images` must have shape (N, X, Y, Z) or (N, C, X, Y, Z), got "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.float()
        if not bool(torch.isfinite(images).all()):
            raise InputError("`images` must be finite, got NaN or inf voxels")
        n = images.shape[0]
        ids = [f"sub-{i:04d}" for i in range(n)] if participant_ids is None else participant_ids
        return cls._build(TensorSource(images), n, ages, sex, ids, sites, stage1, features,
                          feature_names, channel_names)

    @classmethod
    def from_dataset(cls, dataset: Any, *, preload: bool = True,
                     dtype: torch.dtype = torch.float16) -> SubjectData:
        """Subjects from a ``rankcore.cache.VolumeDataset`` (or any object with its attributes
        ``ages``, ``sexes``, ``sites``, ``keys`` and ``volume(i)``; ``channels(i)``,
        ``channel_names``, ``features`` and ``feature_names`` when it has them).

        Args:
            dataset: the dataset.
            preload: read every image once into a ``dtype`` tensor in memory (fast epochs);
                False reads the images of each batch when it is needed.
            dtype: storage dtype of preloaded images (float16 halves the memory; the
                cache stores float16 by default, so nothing is lost).
        """
        n = len(dataset)
        if n == 0:
            raise InputError("the dataset is empty: no subjects to train on")
        source: TensorSource | DatasetSource = DatasetSource(dataset)
        if preload:
            first = read_channels(dataset, 0)
            images = torch.empty((n, *first.shape), dtype=dtype)
            for i in range(n):
                images[i] = torch.from_numpy(np.asarray(read_channels(dataset, i),
                                                        dtype=np.float32))
            source = TensorSource(images)
        ids = getattr(dataset, "keys", None) or [f"sub-{i:04d}" for i in range(n)]
        features, names = dataset_features(dataset)
        return cls._build(source, n, dataset.ages, getattr(dataset, "sexes", None), ids,
                          getattr(dataset, "sites", None), None, features, names,
                          getattr(dataset, "channel_names", None))

    @classmethod
    def _build(cls, source, n, ages, sex, ids, sites, stage1, features=None,
               feature_names=None, channel_names=None) -> SubjectData:
        ages = _float_array(ages, "ages", n, allow_nan=True)
        ids = [str(i) for i in ids]
        if len(ids) != n:
            raise ShapeError(f"`participant_ids` must have {n} values, got {len(ids)}")
        if len(set(ids)) != n:
            raise InputError("`participant_ids` must be unique")
        sites = ["n/a"] * n if sites is None else [str(s) for s in sites]
        if len(sites) != n:
            raise ShapeError(f"`sites` must have {n} values, got {len(sites)}")
        s1 = None if stage1 is None else _float_array(stage1, "stage1", n)
        feats, fnames = _features(features, feature_names, n)
        c = source.channels
        cnames = (("intensity", *(f"channel-{k}" for k in range(1, c)))
                  if channel_names is None else tuple(str(x) for x in channel_names))
        if len(cnames) != c or len(set(cnames)) != c:
            raise ShapeError(f"`channel_names` must be {c} distinct names (one per image "
                             f"channel), got {list(cnames)}")
        return cls(source, np.arange(n), ages, encode_sex(sex, n), ids, sites, s1, feats,
                   fnames, cnames)

    # ---- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._source.shape

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    def _view(self, idx: Any, stage1: np.ndarray | None) -> SubjectData:
        return SubjectData(self._source, self._rows[idx], self.ages[idx], self.sex[idx],
                           [self.participant_ids[i] for i in idx],
                           [self.sites[i] for i in idx], stage1, self.features[idx],
                           self.feature_names, self.channel_names)

    def subset(self, indices: Any) -> SubjectData:
        """The subjects at ``indices`` (positions in this data), sharing the images."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < -len(self) or idx.max() >= len(self))):
            raise InputError(f"`indices` must be positions in [0, {len(self)}), got shape "
                             f"{idx.shape}")
        return self._view(idx, None if self.stage1 is None else self.stage1[idx])

    def with_stage1(self, stage1: Any) -> SubjectData:
        """The same subjects with stage-1 estimates (N,) in years attached (stage 2's input)."""
        s1 = _float_array(stage1, "stage1", len(self))
        return self._view(np.arange(len(self)), s1)

    def batch(self, indices: np.ndarray, device: torch.device | str = "cpu",
              model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Tensors of the subjects at ``indices``, on ``device``.

        Args:
            indices: positions in this data.
            device: where the tensors go.
            model: a stage model (or its DDP wrapper); when its backbone has a histogram
                branch the batch carries that branch's counts, computed once per subject
                (see the module doc).

        Returns:
            ``image`` (b, C, X, Y, Z) float32, ``age`` (b,) float32 years (NaN if unknown),
            ``sex`` (b,) float32 codes, ``features`` (b, F) float32 (NaN where missing),
            ``stage1`` (b,) float32 years when attached, ``hist_counts`` (b, bins) float32
            when ``model`` has a histogram branch, and ``sites``: the b site labels (a tuple
            of str, not a tensor; models that take the site turn them into codes, see
            :func:`rankcore.train.predict.forward_batch`).
        """
        idx = np.asarray(indices, dtype=np.int64)
        rows = self._rows[idx]
        image = self._source.get(rows).to(device)
        out = {
            "image": image,
            "age": torch.from_numpy(self.ages[idx].astype(np.float32)).to(device),
            "sex": torch.from_numpy(self.sex[idx]).to(device),
            "features": torch.from_numpy(self.features[idx].astype(np.float32)).to(device),
            "sites": tuple(self.sites[i] for i in idx),
        }
        if self.stage1 is not None:
            out["stage1"] = torch.from_numpy(self.stage1[idx].astype(np.float32)).to(device)
        backbone = getattr(getattr(model, "module", model), "backbone", None)
        if getattr(backbone, "histogram", None) is not None:
            out["hist_counts"] = self._source.histograms.get(backbone, len(self._source),
                                                             rows, image)
        return out

    def require_ages(self, name: str) -> None:
        """Raise InputError unless every subject has a finite age."""
        if len(self) == 0:
            raise InputError(f"`{name}` is empty: no subjects")
        missing = ~np.isfinite(self.ages)
        if missing.all():
            raise InputError(f"`{name}` has no ages: every one of its {len(self)} subjects "
                             "lacks an age, and training needs them")
        if missing.any():
            ids = [self.participant_ids[i] for i in np.flatnonzero(missing)[:3]]
            raise InputError(f"`{name}` has {int(missing.sum())} subject(s) without an age "
                             f"(e.g. {ids}); drop them or give their ages")


def as_subject_data(data: Any, name: str) -> SubjectData:
    """Accept a SubjectData, a VolumeDataset-like object, or a dict of tensors."""
    if isinstance(data, SubjectData):
        return data
    if isinstance(data, dict):
        d = dict(data)
        try:
            images, ages = d.pop("images"), d.pop("ages")
        except KeyError as err:
            raise InputError(f"`{name}` as a dict must hold 'images' and 'ages', got keys "
                             f"{sorted(data)}") from err
        return SubjectData.from_tensors(images, ages, **d)
    if (hasattr(data, "volume") or hasattr(data, "channels")) and hasattr(data, "ages"):
        return SubjectData.from_dataset(data)
    raise InputError(f"`{name}` must be a SubjectData, a VolumeDataset or a dict with 'images' "
                     f"and 'ages', got {type(data).__name__}")


def dataset_features(dataset: Any) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """A dataset's tabular features (N, F) and names, or (None, ()) when it has none."""
    feats = getattr(dataset, "features", None)
    if feats is None or callable(feats):
        return None, ()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[1] == 0:
        return None, ()
    return feats, tuple(getattr(dataset, "feature_names", None)
                        or (f"feature-{k}" for k in range(feats.shape[1])))


def _features(values: Any, names: Any, n: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Validated tabular features (n, F) float64 and their F names."""
    if values is None:
        if names:
            raise ShapeError(f"`feature_names` must be empty without `features`, got "
                             f"{list(names)}")
        return np.zeros((n, 0)), ()
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"`features` must be numbers, got {type(values).__name__}") from None
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ShapeError(f"`features` must have shape ({n}, F), got {arr.shape}")
    if np.isinf(arr).any():
        raise InputError(f"`features` must be finite or NaN (missing), got "
                         f"{int(np.isinf(arr).sum())} infinite value(s)")
    f = arr.shape[1]
    names = tuple(f"feature-{k}" for k in range(f)) if names is None else \
        tuple(str(x) for x in names)
    if len(names) != f or len(set(names)) != f or not all(names):
        raise ShapeError(f"`feature_names` must be {f} distinct non-empty names, got "
                         f"{list(names)}")
    return arr, names


def _float_array(values: Any, name: str, n: int, *, allow_nan: bool = False) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be numbers (years), got {type(values).__name__}") from None
    if arr.shape != (n,):
        raise ShapeError(f"`{name}` must have shape ({n},), got {arr.shape}")
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"`{name}` must be finite, got {int(bad.sum())} non-finite value(s)")
    return arr


def stratified_folds(ages: Any, k: int, seed: int) -> np.ndarray:
    """Fold labels (N,) in 0..k-1, stratified by age.

    Subjects are sorted by age and cut into consecutive groups of k; each group's members are
    dealt to the k folds in a seeded random order. Every fold thus spans the whole age range,
    and fold sizes differ by at most one.

    Raises:
        InputError: k < 2 or fewer subjects than folds.
    """
    ages = np.asarray(ages, dtype=np.float64)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise InputError(f"`k` must be an integer >= 2, got {k!r}")
    if len(ages) < k:
        raise InputError(f"`k` must be at most the number of subjects ({len(ages)}), got {k}")
    rng = np.random.default_rng(seed)
    order = np.argsort(ages, kind="stable")
    folds = np.empty(len(ages), dtype=np.int64)
    for start in range(0, len(ages), k):
        group = order[start:start + k]
        folds[group] = rng.permutation(k)[:len(group)]
    return folds
