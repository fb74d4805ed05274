"""An upper bound on the output grid (``shape`` at ``spacing``), checked before any work.

Preprocessing one subject holds several float32 arrays of the output grid at once (the
resampled image, tissue probabilities, masks, the normalised volume): about
:data:`BYTES_PER_VOXEL` bytes per output voxel at its peak. A grid is refused when

- one subject would need more than :func:`memory_budget` bytes: a quarter of the memory
  available now (so that a few workers and the rest of the process fit), and never more than
  :data:`MAX_SUBJECT_BYTES` (a sanity cap, whatever the machine), or
- an axis spans more than :data:`MAX_EXTENT_MM` millimetres: a head fits in about 256 mm, so
  a larger field of view is a unit or typing mistake, not a brain.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rankcore.errors import InputError

__all__ = ["BYTES_PER_VOXEL", "MAX_EXTENT_MM", "MAX_SUBJECT_BYTES", "available_memory",
           "check_output_grid", "check_shape", "memory_budget"]

#: Peak working memory of one subject's preprocessing, per output voxel (bytes).
BYTES_PER_VOXEL = 12
#: The most one subject may take, whatever the machine (1 GiB: a 1 mm whole-head grid such
#: as 182 x 218 x 182 needs ~90 MB).
MAX_SUBJECT_BYTES = 1 << 30
#: The widest field of view per axis, in mm.
MAX_EXTENT_MM = 512.0


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable, capped by a cgroup limit).

    Falls back to total physical memory where /proc is missing.
    """
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            found.append(int(limit))
    except OSError:
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError, AttributeError):
            found.append(MAX_SUBJECT_BYTES * 4)
    return min(found)


def memory_budget(available: int | None = None) -> int:
    """The most bytes one subject may take: a quarter of ``available``, at most 1 GiB."""
    available = available_memory() if available is None else int(available)
    return max(0, min(MAX_SUBJECT_BYTES, available // 4))


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB"


def check_output_grid(shape: Sequence[int], spacing: float, *,
                      available: int | None = None) -> None:
    """Refuse an output grid too large for memory or for a head (see the module docstring).

    Args:
        shape: voxels per axis (three positive integers).
        spacing: voxel size in mm (positive).
        available: bytes of available memory (None: :func:`available_memory`).

    Raises:
        InputError: "`shape` must be …, got …", saying the bound and what the grid needs.
    """
    shape = tuple(int(s) for s in shape)
    voxels = shape[0] * shape[1] * shape[2]
    need = voxels * BYTES_PER_VOXEL
    budget = memory_budget(available)
    if need > budget:
        raise InputError(
            f"`shape` must need at most {_gib(budget)} per subject (a quarter of the "
            f"memory available, at most {_gib(MAX_SUBJECT_BYTES)}): at most "
            f"{budget // BYTES_PER_VOXEL:,} voxels, got {shape} ({voxels:,} voxels, about "
            f"{_gib(need)} per subject)")
    extent = max(shape) * float(spacing)
    if extent > MAX_EXTENT_MM:
        raise InputError(
            f"`shape` must span at most {MAX_EXTENT_MM:g} mm per axis at spacing "
            f"{float(spacing):g} mm (at most {int(MAX_EXTENT_MM // float(spacing))} voxels; a "
            f"head fits in about 256 mm), got {shape} ({extent:g} mm)")


def check_shape(shape: Sequence[int] | None, spacing: float | None = None
                ) -> tuple[int, int, int] | None:
    """``shape`` as three positive voxel counts (None passes); with ``spacing``, also an
    output grid that :func:`check_output_grid` accepts.

    Raises:
        InputError: not three positive integers, or a grid too large.
    """
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) != 3 or any(int(s) != s or s <= 0 for s in shape):
        raise InputError(f"`shape` must be three positive integers, got {shape}")
    if spacing is not None:
        check_output_grid(shape, spacing)
    return shape  # type: ignore[return-value]
