"""The records that cohort parsing, loading, preprocessing and the cache pass between them.

Defined once here so that rankcore.mri (producer) and rankcore.cache (consumer) agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rankcore.errors import InputError

#: Every reason a subject can be quarantined for; the cache's quarantine table uses these.
QUARANTINE_CATEGORIES = (
    "duplicate_id",   # participant_id + session appears twice in the cohort table
    "bad_age",        # age not numeric, negative, or missing where it is required
    "missing_file",   # the image path does not exist
    "outside_root",   # the image path leaves the cohort root (and that was not allowed)
    "too_large",      # the header promises an absurd voxel count / byte size
    "bad_affine",     # missing, non-finite or singular affine
    "unreadable",     # not a NIfTI file, truncated, or fails to decompress
    "wrong_dims",     # not 3-D, and not 4-D with a single volume
    "nonfinite",      # NaN or inf voxels
    "empty",          # constant image or no brain found
    "tissue_failed",  # tissue classification untrustworthy (not a skull-stripped T1 brain)
    "not_skull_stripped",  # a whole head (scalp, skull) around the brain: strip it first
)

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class QuarantineEntry:
    """One subject (or table row) that was set aside, with the reason."""

    participant_id: str
    source: str
    category: str
    message: str

    def __post_init__(self) -> None:
        if self.category not in QUARANTINE_CATEGORIES:
            raise InputError(f"`category` must be one of {QUARANTINE_CATEGORIES}, "
                             f"got {self.category!r}")


@dataclass(frozen=True)
class CohortRow:
    """One subject-session of a cohort: where its T1 image is and what is known about it.

    ``age`` is in years (None when unknown, allowed for prediction); ``age_censored`` marks
    BIDS ages written "89+" (stored as 89.0). ``extra`` keeps the other table columns as text.
    """

    participant_id: str
    path: Path
    session: str | None = None
    age: float | None = None
    age_censored: bool = False
    sex: str | None = None
    site: str | None = None
    split: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique key of the subject-session: ``participant_id`` or ``participant_id/session``."""
        if self.session is None:
            return self.participant_id
        return f"{self.participant_id}/{self.session}"


@dataclass(frozen=True)
class Cohort:
    """A parsed cohort: the usable rows, the rows set aside, and where it came from.

    ``notes`` are things a reader should know that set nothing aside (identical repeated
    rows collapsed to one).
    """

    root: Path
    kind: Literal["bids", "manifest", "image", "images"]
    rows: tuple[CohortRow, ...]
    quarantine: tuple[QuarantineEntry, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreprocessConfig:
    """How every volume is brought onto one grid. Its digest names the cache it fills.

    Attributes:
        spacing: isotropic output voxel size in mm.
        shape: output grid (x, y, z) in voxels, RAS-oriented, centred on the brain.
        normalise: intensity normalisation; "zscore_brain" = z-score inside a brain mask.
        dtype: storage dtype of the preprocessed volume in the cache.
        max_voxels: headers promising more voxels than this are refused (`too_large`).
        tissue: measure tissue (rankcore.mri.tissue): N4 bias correction (the stored volume
            is then z-scored after it), affine alignment to the MNI template, GM/WM/CSF
            probability channels and tissue features; scans it fails on are quarantined
            (`tissue_failed`).
        tissue_method: names the tissue algorithm (part of the digest, so that a cache
            written by another algorithm is never mixed in).
        bias_shrink_mm: voxel size (mm) of the copy N4 fits the bias field on.
        register_mm: voxel size (mm) of the grids the affine registration runs on.
        tissue_prior_floor: weight in [0, 1) of a uniform prior mixed into the template's
            tissue priors (0: the template alone decides where each class may be).
        allow_whole_head: process an image that looks like a whole head
            (:mod:`rankcore.mri.whole_head`) as it is, instead of quarantining it
            (`not_skull_stripped`). Only written into :meth:`to_dict` (and so the digest)
            when true: caches and model cards made before it existed keep their digest.
    """

    spacing: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    normalise: Literal["zscore_brain"] = "zscore_brain"
    dtype: Literal["float16", "float32"] = "float16"
    max_voxels: int = 512 * 512 * 512
    tissue: bool = True
    tissue_method: Literal["n4-mni-pvem-1"] = "n4-mni-pvem-1"
    bias_shrink_mm: float = 6.0
    register_mm: float = 4.0
    tissue_prior_floor: float = 0.1
    allow_whole_head: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.spacing, int | float) and np.isfinite(self.spacing)
                and self.spacing > 0):
            raise InputError(f"`spacing` must be a positive number of mm, got {self.spacing!r}")
        shape = tuple(self.shape)
        if len(shape) != 3 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
            raise InputError(f"`shape` must be three positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "spacing", float(self.spacing))
        if not isinstance(self.tissue, bool):
            raise InputError(f"`tissue` must be true or false, got {self.tissue!r}")
        if self.tissue_method != "n4-mni-pvem-1":
            raise InputError(f"`tissue_method` must be 'n4-mni-pvem-1', got "
                             f"{self.tissue_method!r}")
        for name in ("bias_shrink_mm", "register_mm"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 1.0 <= v <= 12.0):
                raise InputError(f"`{name}` must be a number of mm in [1, 12], got {v!r}")
            object.__setattr__(self, name, float(v))
        f = self.tissue_prior_floor
        if not (isinstance(f, int | float) and 0.0 <= f < 1.0):
            raise InputError(f"`tissue_prior_floor` must be in [0, 1), got {f!r}")
        object.__setattr__(self, "tissue_prior_floor", float(f))
        if not isinstance(self.allow_whole_head, bool):
            raise InputError(f"`allow_whole_head` must be true or false, got "
                             f"{self.allow_whole_head!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not self.allow_whole_head:
            del d["allow_whole_head"]
        return d

    def digest(self) -> str:
        """Short sha256 of the canonical JSON of this config (names the cache folder)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class PreprocessedVolume:
    """A volume on the target grid, with what was done to it.

    Attributes:
        data: float32 array of shape ``config.shape`` (RAS, normalised intensities).
        affine: 4x4 voxel-to-world (mm) affine of ``data``.
        spacing: output voxel size (mm, 3 values).
        source_orientation: axis codes of the source image, e.g. "LAS".
        source_spacing: voxel size of the source image (mm, 3 values).
        source_shape: voxel grid of the source image.
        actions: human-readable steps taken ("reoriented LAS->RAS", "resampled 1.0mm->2.0mm").
        features: scalar features (brain_volume_ml, p01, p50, p99 of source intensities).
        tissue: float32 (3, X, Y, Z) GM, WM, CSF probabilities, or None (``config.tissue``
            off).
        tissue_features: float64 (len(rankcore.mri.tissue.TISSUE_FEATURES),), or None.
        tissue_seconds: CPU seconds of the tissue steps ("bias", "register", "em",
            "features"), for logs and benchmarks (not cached), or None.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_orientation: str
    source_spacing: tuple[float, float, float]
    source_shape: tuple[int, ...]
    actions: list[str] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
    tissue: np.ndarray | None = None
    tissue_features: np.ndarray | None = None
    tissue_seconds: dict[str, float] | None = None
