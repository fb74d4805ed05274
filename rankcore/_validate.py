"""Validators shared by every public function: messages read "`name` must be ..., got ...".

One function per recurring check, so the same parameter is checked the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rankcore.errors import InputError, ShapeError


def as_tensor(x: Any, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a tensor (numpy arrays and sequences are converted, tensors kept).

    Integer and boolean inputs become float64 (numpy) or the default float dtype (torch),
    because every rank and metric in rankcore is a float.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray | Sequence | int | float | np.number):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"`{name}` must be numeric, got dtype {arr.dtype}")
        if arr.dtype.kind in "biu":
            arr = arr.astype(np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise InputError(f"`{name}` must be a tensor or an array, got {type(x).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                   torch.int64, torch.uint8, torch.bool)):
        raise InputError(f"`{name}` must be a real tensor, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if dtype is not None:
        t = t.to(dtype)
    return t


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise InputError when ``x`` holds NaN or inf (one device sync, no host copy of data)."""
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"`{name}` must be finite, got {n_bad} NaN or inf value(s)")


def check_ranked_dim(x: torch.Tensor, name: str, dim: int) -> int:
    """Check that ``x`` is at least 1-d and non-empty along ``dim``; return ``dim`` normalised."""
    if x.ndim == 0:
        raise ShapeError(f"`{name}` must have at least one dimension, got a 0-d tensor")
    if not -x.ndim <= dim < x.ndim:
        raise ShapeError(f"`dim` must be in [{-x.ndim}, {x.ndim - 1}] for `{name}` of shape "
                         f"{tuple(x.shape)}, got {dim}")
    dim = dim % x.ndim
    if x.numel() == 0 or x.shape[dim] == 0:
        raise ShapeError(f"`{name}` must be non-empty, got shape {tuple(x.shape)}")
    return dim


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ShapeError unless ``a`` and ``b`` have identical shapes (no broadcasting)."""
    if a.shape != b.shape:
        raise ShapeError(f"`{name_a}` and `{name_b}` must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as float when it is a finite number > 0, else raise InputError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a positive number, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise InputError(f"`{name}` must be a positive number, got {value!r}")
    return v


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` when it is one of ``choices``, else raise InputError listing them."""
    if value not in choices:
        raise InputError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
