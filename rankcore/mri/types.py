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
    """A parsed cohort: the usable rows, the rows set aside, and where it came from."""

    root: Path
    kind: Literal["bids", "manifest", "image", "images"]
    rows: tuple[CohortRow, ...]
    quarantine: tuple[QuarantineEntry, ...] = ()


@dataclass(frozen=True)
class PreprocessConfig:
    """How every volume is brought onto one grid. Its digest names the cache it fills.

    Attributes:
        spacing: isotropic output voxel size in mm.
        shape: output grid (x, y, z) in voxels, RAS-oriented, centred on the brain.
        normalise: intensity normalisation; "zscore_brain" = z-score inside a brain mask.
        dtype: storage dtype of the preprocessed volume in the cache.
        max_voxels: headers promising more voxels than this are refused (`too_large`).
    """

    spacing: float = 2.0
    shape: tuple[int, int, int] = (80, 96, 80)
    normalise: Literal["zscore_brain"] = "zscore_brain"
    dtype: Literal["float16", "float32"] = "float16"
    max_voxels: int = 512 * 512 * 512

    def __post_init__(self) -> None:
        if not (isinstance(self.spacing, int | float) and np.isfinite(self.spacing)
                and self.spacing > 0):
            raise InputError(f"`spacing` must be a positive number of mm, got {self.spacing!r}")
        shape = tuple(self.shape)
        if len(shape) != 3 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
            raise InputError(f"`shape` must be three positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "spacing", float(self.spacing))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
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
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_orientation: str
    source_spacing: tuple[float, float, float]
    source_shape: tuple[int, ...]
    actions: list[str] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
