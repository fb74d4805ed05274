"""T1 MRI ingest: cohort parsing (BIDS, manifests), nibabel loading with checks, preprocessing.

Public API:

- :func:`read_cohort` — BIDS root or manifest (.csv/.tsv/.parquet) -> :class:`Cohort`
- :func:`inspect_header`, :func:`load_volume` — checked NIfTI-1/2 reading (-> `HeaderInfo`)
- :func:`preprocess_volume`, :func:`preprocess_file`, :func:`describe` — RAS, target spacing
  and shape, z-scored brain (-> :class:`PreprocessedVolume`)
- the shared records of :mod:`rankcore.mri.types`
- :func:`simulate_cohort`, :func:`read_truth`, :func:`irreducible_floor` from
  :mod:`rankcore.mri.simulate`, imported on first use (it pulls in torch, which ingest
  workers do not need)
"""

from rankcore.mri.cohort import read_cohort
from rankcore.mri.load import HeaderInfo, check_affine, check_voxels, inspect_header, load_volume
from rankcore.mri.preprocess import brain_mask, describe, preprocess_file, preprocess_volume
from rankcore.mri.types import (
    QUARANTINE_CATEGORIES,
    Cohort,
    CohortRow,
    PreprocessConfig,
    PreprocessedVolume,
    QuarantineEntry,
)

_LAZY = {"simulate_cohort": "simulate", "read_truth": "simulate", "irreducible_floor": "simulate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rankcore.mri.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rankcore.mri' has no attribute {name!r}")


__all__ = [
    "QUARANTINE_CATEGORIES",
    "Cohort",
    "CohortRow",
    "HeaderInfo",
    "PreprocessConfig",
    "PreprocessedVolume",
    "QuarantineEntry",
    "brain_mask",
    "check_affine",
    "check_voxels",
    "describe",
    "inspect_header",
    "irreducible_floor",
    "load_volume",
    "preprocess_file",
    "preprocess_volume",
    "read_cohort",
    "read_truth",
    "simulate_cohort",
]
