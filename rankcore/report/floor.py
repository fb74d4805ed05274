"""The irreducible error floor of a simulated cohort, for the report.

A simulated subject's brain age differs from its chronological age by delta ~ N(0, sigma):
even a perfect brain-age model has MAE = mean |delta| against chronological age. The
simulator writes delta into ``derivatives/simulation/truth.tsv``; this module reads that
table ONLY to report the floor (never a prediction, a metric or a fit reads it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError

__all__ = ["find_truth_table", "simulated_floor"]

#: How far above an image the cohort root may be (sub-X/[ses-Y/]anat/file).
_MAX_DEPTH = 4


def find_truth_table(source_paths: Sequence[str]) -> Path | None:
    """The truth.tsv of the simulated cohort holding these images, or None (not simulated)."""
    from rankcore.mri.simulate import TRUTH_RELPATH

    for source in source_paths[:1]:
        for parent in list(Path(source).parents)[:_MAX_DEPTH]:
            candidate = parent / TRUTH_RELPATH
            if candidate.is_file():
                return candidate
    return None


def simulated_floor(source_paths: Sequence[str], participant_ids: Sequence[str]
                    ) -> dict[str, Any] | None:
    """The floor over the evaluated subjects, when their images come from a simulation.

    A subject counts when its truth row names the same image file (so that ids of another
    cohort cannot match by accident).

    Args:
        source_paths: the evaluated subjects' image paths (the cache's ``source_path``).
        participant_ids: their ids, in the same order.

    Returns:
        None for a cohort that is not simulated, else ``{"mae": mean |brain_age - age| over
        the matched subjects, "n": matched, "cohort_mae": the whole cohort's floor,
        "truth_table": path}`` (``mae`` None when no subject matched).
    """
    from rankcore.mri.simulate import irreducible_floor, read_truth

    truth = find_truth_table(source_paths)
    if truth is None:
        return None
    root = truth.parent.parent.parent
    try:
        rows = read_truth(truth)
        cohort_mae = irreducible_floor(truth)
    except (InputError, KeyError, ValueError):
        return None
    by_file: dict[str, float] = {}
    for row in rows:
        if row.get("corruption", "n/a") != "n/a":
            continue
        age = 89.0 if row["age"] == "89+" else float(row["age"])
        path = os.path.realpath(root / row["path"])
        by_file[f"{row['participant_id']}|{path}"] = abs(float(row["brain_age"]) - age)
    errors = [by_file[k] for k in (f"{pid}|{os.path.realpath(src)}"
                                   for pid, src in zip(participant_ids, source_paths))
              if k in by_file]
    return {"mae": float(np.mean(errors)) if errors else None, "n": len(errors),
            "cohort_mae": cohort_mae, "truth_table": str(truth)}
