"""Exact ranks of tensors: fractional (average) ranks and SoDeep's normalised rank convention.

Two conventions live here, and only here:

* ``rank`` — the library's own: ascending, 1-based, fractional ranks (ties get the average of
  the positions they span), exactly ``scipy.stats.rankdata(method="average")``.
  Example: ``{1, 1, 2, 3, 3, 4, 5, 5, 5} -> {1.5, 1.5, 3, 4.5, 4.5, 6, 8, 8, 8}``.
* ``get_rank`` / ``get_tiedrank`` — the SoDeep seed code's convention (Engilberge et al.,
  CVPR 2019), kept for fidelity with its pretrained sorters: the normalised descending rank
  ``(N + 1 - R) / N`` in ``[1/N, 1]`` where ``R`` is the ascending 1-based rank, so the largest
  value gets ``1/N`` and the smallest gets ``1``.

Every function is batched (any leading shape, ranks taken along one ``dim``), returns a
detached float tensor on the input's device (ranks are piecewise constant: no gradient), and
costs one sort plus linear-time tie bookkeeping per row, with no Python loop over rows.

How: after sorting a row, a tie group occupies sorted positions ``start..end`` (0-based) and
each member's ascending fractional rank is ``(start + end + 2) / 2``. Two backends compute the
``span = start + end`` of every group:

* accelerators (``"torch"``): a running maximum of group starts from the left and a running
  minimum of group ends from the right — torch ops only, no host copy;
* CPU tensors (``"numpy"``): the same bookkeeping on the flattened rows in numpy, whose
  vectorised argsort is several times faster than torch's per-row CPU sort (measured in
  benchmarks/bench_rankcore.py). The result is converted back with ``torch.from_numpy``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from rankcore._validate import as_tensor, check_finite, check_ranked_dim

__all__ = ["get_rank", "get_tiedrank", "rank"]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
_Kind = Literal["ascending", "descending", "sodeep"]
_Backend = Literal["numpy", "torch"]
_NP_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def _prepare(x: Any, name: str, dim: int) -> tuple[torch.Tensor, int, torch.dtype]:
    """Check ``x``'s type and shape; return (values with the ranked dim last, dim, out dtype).

    Integer tensors are ranked on their integer values (converting int64 to float32 first
    could merge distinct values into false ties); the result is then the default float dtype.
    Half-precision inputs are ranked in float32 (exact) and give float32 ranks, since float16
    cannot hold integers above 2048. Finiteness is checked after sorting (see
    :func:`_check_finite_ends`).
    """
    if isinstance(x, torch.Tensor) and x.dtype in _INT_DTYPES:
        values = x.detach()
        out_dtype = torch.get_default_dtype()
        if values.dtype == torch.bool:
            values = values.to(torch.uint8)
    else:
        values = as_tensor(x, name).detach()
        out_dtype = values.dtype
        if out_dtype in (torch.float16, torch.bfloat16):
            values = values.float()
            out_dtype = torch.float32
    dim = check_ranked_dim(values, name, dim)
    return values.movedim(dim, -1), dim, out_dtype


def _pick_backend(v: torch.Tensor, backend: _Backend | None) -> _Backend:
    return backend or ("numpy" if v.device.type == "cpu" else "torch")


def _row_ends(sorted_v: Any) -> Any:
    """The first and last column of ``sorted_v`` (..., N) (a view; one column when N = 1)."""
    n = sorted_v.shape[-1]
    return sorted_v[..., :: n - 1] if n > 1 else sorted_v


def _check_finite_ends(v: torch.Tensor, ends: Any, name: str) -> None:
    """Raise InputError if ``v`` held NaN or inf, given the ends of its sorted rows.

    Sorting puts every NaN or inf at one end of its row (torch and numpy order NaN after +inf;
    a radix sort on raw float bits puts a sign-bit NaN before -inf), so the first and last
    column suffice: O(rows) instead of an O(N) pass over the data.
    """
    if not v.is_floating_point():
        return
    ok = np.isfinite(ends).all() if isinstance(ends, np.ndarray) else torch.isfinite(ends).all()
    if not bool(ok):
        check_finite(v, name)  # raises, with the count of bad values


def _numerator_denominator(span: Any, n: int, kind: _Kind) -> tuple[Any, int]:
    """Rank = numerator / denominator from ``span = start + end`` (0-based sorted positions)."""
    if kind == "ascending":  # R = (start + end + 2) / 2
        return span + 2, 2
    if kind == "descending":  # N + 1 - R
        return 2 * n - span, 2
    return 2 * n - span, 2 * n  # SoDeep: (N + 1 - R) / N


def _fractional_torch(v: torch.Tensor, kind: _Kind, out_dtype: torch.dtype,
                      name: str) -> torch.Tensor:
    """Fractional ranks of ``v`` (..., N) along the last dim with torch ops on ``v``'s device."""
    n = v.shape[-1]
    sorted_v, order = torch.sort(v, dim=-1)
    _check_finite_ends(v, _row_ends(sorted_v), name)
    pos = torch.arange(n, device=v.device)
    new_group = sorted_v[..., 1:] != sorted_v[..., :-1]
    start = torch.where(F.pad(new_group, (1, 0), value=True), pos, 0).cummax(dim=-1).values
    end_flipped = torch.where(F.pad(new_group, (0, 1), value=True), pos, n).flip(-1)
    end = end_flipped.cummin(dim=-1).values.flip(-1)
    num, den = _numerator_denominator(start + end, n, kind)
    ranks_sorted = num.to(out_dtype).div_(den)
    return torch.empty_like(ranks_sorted).scatter_(-1, order, ranks_sorted)


def _fractional_numpy(v: torch.Tensor, kind: _Kind, out_dtype: torch.dtype,
                      name: str) -> torch.Tensor:
    """Fractional ranks of a CPU tensor ``v`` (..., N) along the last dim, computed in numpy.

    The rows are sorted, then handled as one flat array in which each tie group is a run
    (every row start also starts a group): group bounds come from one ``nonzero``, and all
    gathers and scatters use flat indices (cheaper than take/put_along_axis).
    """
    n = v.shape[-1]
    a = np.ascontiguousarray(v.numpy()).reshape(-1, n)
    # A single row sorts faster with numpy's stable sort, a batch with the default
    # vectorised quicksort (measured on x86-64; either is exact for average ranks).
    order = np.argsort(a, axis=-1, kind="stable" if a.shape[0] == 1 else None)
    flat_order = (order + np.arange(0, a.size, n)[:, None]).ravel()
    sorted_a = a.ravel()[flat_order].reshape(a.shape)
    _check_finite_ends(v, _row_ends(sorted_a), name)
    is_start = np.empty(a.shape, dtype=bool)
    is_start[:, 0] = True
    np.not_equal(sorted_a[:, 1:], sorted_a[:, :-1], out=is_start[:, 1:])
    start = np.flatnonzero(is_start)  # flat index of each group's first member
    count = np.empty_like(start)  # group sizes: next group's start minus this one's
    count[:-1] = start[1:] - start[:-1]
    count[-1] = a.size - start[-1]
    # groups come row after row, so each group's row follows from the groups per row
    # (cheaper than start // n or a 2-D nonzero, both several times slower here)
    row_offset = np.repeat(np.arange(0, a.size, n), is_start.sum(axis=1))
    span = 2 * (start - row_offset) + (count - 1)  # start + end, positions within the row
    num, den = _numerator_denominator(span, n, kind)
    np_dtype = _NP_FLOAT.get(out_dtype, np.float64)
    group_rank = num.astype(np_dtype) / np_dtype(den)
    out = np.empty(a.size, dtype=np_dtype)
    out[flat_order] = np.repeat(group_rank, count)
    return torch.from_numpy(out.reshape(v.shape)).to(out_dtype)


def _fractional(x: Any, dim: int, kind: _Kind, backend: _Backend | None = None,
                name: str = "x") -> torch.Tensor:
    """Fractional ranks of ``x`` along ``dim``; errors name the argument ``name``."""
    v, dim, out_dtype = _prepare(x, name, dim)
    impl = _fractional_numpy if _pick_backend(v, backend) == "numpy" else _fractional_torch
    return impl(v, kind, out_dtype, name).movedim(-1, dim).contiguous()


def _ordinal_sodeep(x: Any, dim: int, backend: _Backend | None = None) -> torch.Tensor:
    """``(N + 1 - R) / N`` with ``R`` the 1-based position in a stable ascending sort."""
    v, dim, out_dtype = _prepare(x, "x", dim)
    n = v.shape[-1]
    if _pick_backend(v, backend) == "numpy":
        a = np.ascontiguousarray(v.numpy())
        order = np.argsort(a, axis=-1, kind="stable")
        _check_finite_ends(v, np.take_along_axis(a, _row_ends(order), axis=-1), "x")
        np_dtype = _NP_FLOAT.get(out_dtype, np.float64)
        values = np.broadcast_to((n - np.arange(n, dtype=np_dtype)) / np_dtype(n), a.shape)
        out_np = np.empty(a.shape, dtype=np_dtype)
        np.put_along_axis(out_np, order, values, axis=-1)
        out = torch.from_numpy(out_np).to(out_dtype)
    else:
        sorted_v, order = torch.sort(v, dim=-1, stable=True)
        _check_finite_ends(v, _row_ends(sorted_v), "x")
        values = torch.arange(n, 0, -1, device=v.device, dtype=out_dtype).div_(n)
        out = torch.empty(v.shape, dtype=out_dtype, device=v.device)
        out.scatter_(-1, order, values.expand(v.shape))
    return out.movedim(-1, dim).contiguous()


def rank(x: Any, dim: int = -1, descending: bool = False) -> torch.Tensor:
    """Fractional (average) 1-based ranks along ``dim``, like ``scipy.stats.rankdata``.

    Args:
        x: Values to rank, a tensor or a numpy array of any shape (..., N, ...); must be finite.
        dim: The dimension to rank along; every other dimension is a batch dimension.
        descending: If True, the largest value gets rank 1 (equals ``N + 1 - rank(x)``).

    Returns:
        A tensor of the same shape and device as ``x`` (a CPU tensor for numpy input),
        detached from any autograd graph, with values in ``[1, N]``: ``x``'s dtype for
        float32/float64 input, float32 for half precision, the default float dtype for integer
        or bool tensors (numpy integers give float64). Tied values share the average of the
        ranks they span, exactly as ``scipy.stats.rankdata(method="average")``.
        (float32 ranks are exact for N up to 2**24.)

    Raises:
        InputError: ``x`` holds NaN or inf, or is not numeric.
        ShapeError: ``x`` is 0-d, empty, or ``dim`` is out of range.

    Example:
        >>> rank(torch.tensor([1., 1, 2, 3, 3, 4, 5, 5, 5])).tolist()
        [1.5, 1.5, 3.0, 4.5, 4.5, 6.0, 8.0, 8.0, 8.0]
    """
    return _fractional(x, dim, "descending" if descending else "ascending")


def get_rank(x: Any, dim: int = 0) -> torch.Tensor:
    """SoDeep's normalised descending rank ``(N + 1 - R) / N``, ties broken by position.

    ``R`` is the ascending 1-based ordinal rank from a stable sort: among equal values, the one
    that comes FIRST along ``dim`` gets the smaller ``R`` and therefore the HIGHER normalised
    rank. Example: ``get_rank([5., 5., 1.]) == [2/3, 1/3, 1]``. (The seed code's argsort was not
    stable, so its tie order was arbitrary; this one is the same on every device.)

    Args:
        x: Values, a tensor or numpy array (..., N, ...); must be finite.
        dim: The dimension to rank along (default 0, the seed code's batch dimension).

    Returns:
        A detached float tensor shaped like ``x`` on its device, values in ``{1/N, ..., 1}``:
        the largest value gets ``1/N``, the smallest ``1``.

    Raises:
        InputError: ``x`` holds NaN or inf, or is not numeric.
        ShapeError: ``x`` is 0-d, empty, or ``dim`` is out of range.
    """
    return _ordinal_sodeep(x, dim)


def get_tiedrank(x: Any, dim: int = 0) -> torch.Tensor:
    """SoDeep's normalised descending rank ``(N + 1 - R) / N`` with tied values averaged.

    ``R`` is the ascending fractional rank of :func:`rank`, so tied values share one value;
    this is the tie-aware target a learned sorter is trained against.
    Example: ``get_tiedrank([5., 5., 1.]) == [0.5, 0.5, 1]``.

    Args:
        x: Values, a tensor or numpy array (..., N, ...); must be finite.
        dim: The dimension to rank along (default 0, the seed code's batch dimension).

    Returns:
        A detached float tensor shaped like ``x`` on its device, values in ``[1/N, 1]``.

    Raises:
        InputError: ``x`` holds NaN or inf, or is not numeric.
        ShapeError: ``x`` is 0-d, empty, or ``dim`` is out of range.
    """
    return _fractional(x, dim, "sodeep")
