"""Seeded percentile-bootstrap confidence intervals of a statistic of paired samples.

The N subjects are resampled with replacement ``n`` times (one ``numpy.random.Generator``
seeded with ``seed``, so an interval is reproducible and two statistics bootstrapped with the
same seed and N see the same resamples). The statistic is evaluated on all resamples at once
when it accepts a batch — every metric of :mod:`rankcore.metrics` does: (B, N) arrays in,
(B,) values out — and resample by resample otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from rankcore.errors import InputError, ShapeError

__all__ = ["bootstrap_ci", "bootstrap_distribution"]

#: Resamples evaluated per batched call (bounds memory to CHUNK × N values per array).
CHUNK = 256


def _arrays(arrays: tuple[Any, ...]) -> list[np.ndarray]:
    if not arrays:
        raise InputError("`arrays` must hold at least one array of N paired values, got none")
    out = []
    for i, x in enumerate(arrays):
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 1:
            raise ShapeError(f"`arrays[{i}]` must be one-dimensional (N,), got shape "
                             f"{arr.shape}")
        out.append(arr)
    n = len(out[0])
    if any(len(a) != n for a in out):
        raise ShapeError(f"`arrays` must all have the same length, got "
                         f"{[len(a) for a in out]}")
    if n == 0:
        raise ShapeError("`arrays` must be non-empty, got length 0")
    return out


def bootstrap_distribution(fn: Callable[..., Any], *arrays: Any, n: int = 1000, seed: int = 0,
                           batched: bool = True) -> np.ndarray:
    """The statistic ``fn`` on ``n`` bootstrap resamples of the paired ``arrays``.

    Args:
        fn: statistic of N paired values. With ``batched`` it is called with (B, N) arrays and
            must return B values (reducing the last axis); otherwise with (N,) arrays,
            returning one number.
        *arrays: one or more (N,) arrays, resampled together (same indices).
        n: number of resamples (>= 1).
        seed: seeds the resampling.
        batched: whether ``fn`` accepts a batch (see ``fn``).

    Returns:
        float64 (n,) values (NaN where ``fn`` gave NaN, e.g. a correlation of a resample
        that drew one subject N times).

    Raises:
        InputError: bad ``n``, ``seed`` or arrays.
        ShapeError: arrays of different lengths, or a batched ``fn`` not returning B values.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise InputError(f"`n` must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"`seed` must be an integer >= 0, got {seed!r}")
    data = _arrays(arrays)
    size = len(data[0])
    rng = np.random.default_rng(int(seed))
    idx = rng.integers(0, size, size=(int(n), size))
    if not batched:
        return np.array([float(fn(*(a[row] for a in data))) for row in idx], dtype=np.float64)
    out = np.empty(int(n), dtype=np.float64)
    for start in range(0, int(n), CHUNK):
        rows = idx[start:start + CHUNK]
        values = np.asarray(fn(*(a[rows] for a in data)), dtype=np.float64)
        if values.shape != (len(rows),):
            raise ShapeError(f"a batched `fn` must return one value per resample, shape "
                             f"({len(rows)},), got {values.shape}; pass batched=False for a "
                             "statistic of 1-D arrays")
        out[start:start + len(rows)] = values
    return out


def bootstrap_ci(fn: Callable[..., Any], *arrays: Any, n: int = 1000, seed: int = 0,
                 level: float = 0.95, batched: bool = True) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``fn(*arrays)``.

    Args:
        fn: the statistic (see :func:`bootstrap_distribution`).
        *arrays: (N,) paired arrays.
        n: number of resamples.
        seed: seeds the resampling (same seed, same N: same resamples).
        level: coverage in (0, 1), e.g. 0.95 for the 2.5 % and 97.5 % percentiles.
        batched: whether ``fn`` takes (B, N) arrays.

    Returns:
        ``(low, high)``; NaN resamples are left out, and ``(nan, nan)`` comes back when every
        resample is NaN.

    Raises:
        InputError, ShapeError: as :func:`bootstrap_distribution`, or ``level`` outside (0, 1).
    """
    if isinstance(level, bool) or not isinstance(level, int | float) \
            or not 0.0 < float(level) < 1.0:
        raise InputError(f"`level` must be a number in (0, 1), got {level!r}")
    values = bootstrap_distribution(fn, *arrays, n=n, seed=seed, batched=batched)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - float(level))
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
