"""Evaluation metrics of brain-age predictions: SRCC, Pearson r, MAE, RMSE, R².

Every metric reduces along ``dim`` (default -1) and treats the other dimensions as a batch, so
``srcc(pred, target)`` on (B, N) tensors gives B correlations in one call.

Input and output kinds:
    * torch tensors in -> a tensor out (0-d for 1-D input), on the inputs' device, in their
      floating dtype (float32 stays float32; integer tensors give the default float dtype).
      ``pearson_r``, ``mae``, ``rmse`` and ``r2`` keep the autograd graph; ``srcc`` does not
      (ranks are piecewise constant).
    * numpy arrays or sequences in -> a Python ``float`` for 1-D input, else a float64
      ``numpy.ndarray`` of the batch shape.
    * one tensor and one array -> the array is moved to the tensor's device; a tensor comes out.

Degenerate input follows scipy: the correlation of a constant sequence (zero variance,
which includes every sequence of length 1) is NaN, and so is ``r2`` for a constant target; no
warning and no exception. NaN or inf in the input raises InputError.

Sums run in float64 (float32 on devices without float64, e.g. MPS) and are cast back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rankcore._validate import as_tensor, check_finite, check_ranked_dim, check_same_shape
from rankcore.errors import InputError
from rankcore.ranks import _fractional

__all__ = ["mae", "pearson_r", "r2", "rmse", "srcc"]


def _pair(a: Any, b: Any, name_a: str, name_b: str, dim: int,
          check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Validate a pair of inputs; return (a, b, normalised dim, True if a tensor was given).

    ``check_values=False`` skips the NaN/inf scan, for callers that rank the inputs (ranking
    checks finiteness itself, after its sort, at no extra pass).
    """
    as_torch = isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
    ta = as_tensor(a, name_a)
    tb = as_tensor(b, name_b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and ta.device != tb.device:
        raise InputError(f"`{name_a}` and `{name_b}` must be on the same device, got "
                         f"{ta.device} and {tb.device}")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    device = ta.device if isinstance(a, torch.Tensor) else tb.device
    ta, tb = ta.to(device=device, dtype=dtype), tb.to(device=device, dtype=dtype)
    check_same_shape(ta, tb, name_a, name_b)
    dim = check_ranked_dim(ta, name_a, dim)
    if check_values:
        check_finite(ta, name_a)
        check_finite(tb, name_b)
    return ta, tb, dim, as_torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype sums are accumulated in: float64 where the device has it."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _out(value: torch.Tensor, dtype: torch.dtype, as_torch: bool) -> Any:
    """Cast back to the inputs' dtype (tensors) or to a float / float64 array (numpy)."""
    if as_torch:
        return value.to(dtype)
    arr = value.detach().cpu().numpy().astype(np.float64)
    return float(arr) if arr.ndim == 0 else arr


def _correlation(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` along ``dim``; NaN where either is constant."""
    acc = _acc_dtype(x)
    x, y = x.to(acc), y.to(acc)
    xc = x - x.mean(dim, keepdim=True)
    yc = y - y.mean(dim, keepdim=True)
    num = (xc * yc).sum(dim)
    den = ((xc * xc).sum(dim) * (yc * yc).sum(dim)).sqrt()
    # Decide "constant" on the raw values, not on den == 0: centering a constant float
    # sequence can leave rounding residue that would otherwise give a meaningless r.
    constant = (x == x.narrow(dim, 0, 1)).all(dim) | (y == y.narrow(dim, 0, 1)).all(dim)
    r = (num / torch.where(constant, torch.ones_like(den), den)).clamp(-1.0, 1.0)
    return torch.where(constant, torch.full_like(r, float("nan")), r)


def _correlation_numpy(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """:func:`_correlation` in numpy (float64), for CPU ranks that need no gradient.

    Same formula and NaN rule; numpy's single-threaded kernels stay fast on a busy CPU where
    torch's intra-op thread pool can stall.
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    xc = x - x.mean(axis, keepdims=True)
    yc = y - y.mean(axis, keepdims=True)
    num = np.einsum("...i,...i->...", np.moveaxis(xc, axis, -1), np.moveaxis(yc, axis, -1))
    den = np.sqrt(np.square(xc).sum(axis) * np.square(yc).sum(axis))
    first = [slice(None)] * x.ndim
    first[axis] = slice(0, 1)
    constant = (x == x[tuple(first)]).all(axis) | (y == y[tuple(first)]).all(axis)
    r = np.clip(num / np.where(constant, 1.0, den), -1.0, 1.0)
    return np.where(constant, np.nan, r)


def srcc(a: Any, b: Any, dim: int = -1) -> Any:
    """Spearman's rank correlation coefficient along ``dim``, with fractional ranks for ties.

    ``rr = cov(R(a), R(b)) / (σ_R(a) σ_R(b))`` (Pearson correlation of the average ranks),
    equal to ``scipy.stats.spearmanr(a, b).statistic`` for 1-D input.

    Args:
        a: Values (..., N, ...), tensor or array, finite.
        b: Values of the same shape as ``a``.
        dim: The dimension holding the N paired observations.

    Returns:
        The batch of correlations in [-1, 1] (shape of ``a`` without ``dim``), NaN where
        ``a`` or ``b`` is constant along ``dim``; detached. See the module docstring for the
        output kind.

    Raises:
        InputError: NaN or inf in an input, non-numeric input, or inputs on different devices.
        ShapeError: Shapes differ, input is 0-d or empty, or ``dim`` is out of range.
    """
    ta, tb, dim, as_torch = _pair(a, b, "a", "b", dim, check_values=False)
    ra = _fractional(ta, dim, "ascending", name="a")  # = rank(), naming the argument
    rb = _fractional(tb, dim, "ascending", name="b")
    if ra.device.type == "cpu":
        r = torch.from_numpy(np.asarray(_correlation_numpy(ra.numpy(), rb.numpy(), dim)))
    else:
        r = _correlation(ra, rb, dim)
    return _out(r, ta.dtype, as_torch)


def pearson_r(a: Any, b: Any, dim: int = -1) -> Any:
    """Pearson's correlation coefficient along ``dim`` (like ``scipy.stats.pearsonr``).

    Args:
        a: Values (..., N, ...), tensor or array, finite.
        b: Values of the same shape as ``a``.
        dim: The dimension holding the N paired observations.

    Returns:
        Correlations in [-1, 1] with ``dim`` removed; NaN where an input is constant along
        ``dim``. Differentiable for tensor input.

    Raises:
        InputError: NaN or inf in an input, non-numeric input, or inputs on different devices.
        ShapeError: Shapes differ, input is 0-d or empty, or ``dim`` is out of range.
    """
    ta, tb, dim, as_torch = _pair(a, b, "a", "b", dim)
    return _out(_correlation(ta, tb, dim), ta.dtype, as_torch)


def mae(pred: Any, target: Any, dim: int = -1) -> Any:
    """Mean absolute error ``mean(|pred - target|)`` along ``dim``, in the inputs' units (years).

    Args:
        pred: Predictions (..., N, ...), tensor or array, finite.
        target: Targets of the same shape.
        dim: The dimension to average over.

    Returns:
        Non-negative errors with ``dim`` removed. Differentiable for tensor input.

    Raises:
        InputError: NaN or inf in an input, non-numeric input, or inputs on different devices.
        ShapeError: Shapes differ, input is 0-d or empty, or ``dim`` is out of range.
    """
    p, t, dim, as_torch = _pair(pred, target, "pred", "target", dim)
    acc = _acc_dtype(p)
    return _out((p.to(acc) - t.to(acc)).abs().mean(dim), p.dtype, as_torch)


def rmse(pred: Any, target: Any, dim: int = -1) -> Any:
    """Root mean squared error ``sqrt(mean((pred - target)²))`` along ``dim``, in years.

    Args:
        pred: Predictions (..., N, ...), tensor or array, finite.
        target: Targets of the same shape.
        dim: The dimension to average over.

    Returns:
        Non-negative errors with ``dim`` removed. Differentiable for tensor input (except
        where the error is exactly zero, where sqrt has an infinite slope).

    Raises:
        InputError: NaN or inf in an input, non-numeric input, or inputs on different devices.
        ShapeError: Shapes differ, input is 0-d or empty, or ``dim`` is out of range.
    """
    p, t, dim, as_torch = _pair(pred, target, "pred", "target", dim)
    acc = _acc_dtype(p)
    return _out((p.to(acc) - t.to(acc)).square().mean(dim).sqrt(), p.dtype, as_torch)


def r2(pred: Any, target: Any, dim: int = -1) -> Any:
    """Coefficient of determination ``1 - Σ(target - pred)² / Σ(target - mean(target))²``.

    The argument order matters (the denominator is the target's spread); this is
    ``sklearn.metrics.r2_score(target, pred)`` except that a constant target gives NaN.

    Args:
        pred: Predictions (..., N, ...), tensor or array, finite.
        target: Targets of the same shape.
        dim: The dimension holding the N observations.

    Returns:
        Values in (-inf, 1] with ``dim`` removed; NaN where ``target`` is constant along
        ``dim``. Differentiable for tensor input.

    Raises:
        InputError: NaN or inf in an input, non-numeric input, or inputs on different devices.
        ShapeError: Shapes differ, input is 0-d or empty, or ``dim`` is out of range.
    """
    p, t, dim, as_torch = _pair(pred, target, "pred", "target", dim)
    acc = _acc_dtype(p)
    pa, ta = p.to(acc), t.to(acc)
    ss_res = (ta - pa).square().sum(dim)
    ss_tot = (ta - ta.mean(dim, keepdim=True)).square().sum(dim)
    constant = (ta == ta.narrow(dim, 0, 1)).all(dim)
    value = 1.0 - ss_res / torch.where(constant, torch.ones_like(ss_tot), ss_tot)
    return _out(torch.where(constant, torch.full_like(value, float("nan")), value),
                p.dtype, as_torch)
