"""Resampling kernels of :mod:`rankcore.mri.preprocess`: per-axis linear maps and point lookups.

Every map here takes a 4x4 matrix ``m`` that sends an output voxel index (i, j, k, 1) to a
(fractional) source voxel index, and samples a float32 source at those positions.

- Axis-aligned maps (each output axis reads one source axis: flips, permutations and
  anisotropic zooms, no rotation; :func:`axis_permutation`) are separable: three 1-D linear
  maps, each a sparse matrix (:func:`interp_matrix`, n_out x n_in) applied along one axis
  (:func:`apply_separable`). A matrix holds linear interpolation at the output positions and,
  optionally, a Gaussian low-pass along that axis before it (anti-aliasing), so the filter
  costs no pass of its own: each output value is a few multiply-adds (2 for plain
  interpolation). A 2 mm head onto 80x96x80 takes ~1.5 ms (one core; the ``np.take``
  version this replaced ~15 ms, ``scipy.ndimage.affine_transform`` order 1 ~30 ms, same
  result). Where the last axis reads evenly stepped neighbours (a grid as fine as the
  source's), that axis is two strided views instead of a transposed copy and a product
  (``source_order=True``; same bits). A boolean mask goes through :func:`mask_separable`,
  which counts each cell's mask corners one axis at a time and blends only the cells at
  the mask's boundary (through a 256-entry table of corner patterns when every cell is
  read with the same weights); ~1 ms for a 2 mm brain.
- Other maps (oblique, rotated grids) are sampled point by point, a few output slabs at a
  time (:func:`sample_affine`; :func:`sample_masked` for an image and its mask, the image
  only inside the mask): eight gathers and seven linear blends per point, ~8-10 ms for a
  2 mm brain onto 80x96x80 (``scipy.ndimage.affine_transform`` order 1 ~30 ms,
  ``map_coordinates`` on the brain's points alone ~14 ms).

Edges: ``zero_outside=False`` extends the source by its edge values (scipy mode "nearest");
``zero_outside=True`` gives 0 at positions more than 1e-6 voxel beyond the first or last
voxel centre (scipy mode "constant" with cval 0).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

#: Positions this far (voxels) beyond the first/last voxel centre still count as inside.
_EDGE_TOL = 1e-6
#: Gaussian taps lighter than this fraction of the central one are dropped (and the rest
#: renormalised): they change no value by more than ~0.1 %, and cost a full pass each.
_MIN_TAP = 1e-3


def axis_permutation(lin: np.ndarray) -> tuple[int, int, int] | None:
    """The source axis each output axis reads, or None when ``lin`` mixes axes.

    Args:
        lin: 3x3 matrix, d(source index q) / d(output index d) in ``lin[q, d]``.

    Returns:
        ``perm`` with ``perm[d]`` the only source axis that output axis d moves along, when
        every off-pattern entry is below 1e-6 of the largest; else None.
    """
    a = np.abs(np.asarray(lin, dtype=np.float64))
    perm = tuple(int(np.argmax(a[:, d])) for d in range(3))
    if sorted(perm) != [0, 1, 2]:
        return None
    off = a.copy()
    off[list(perm), [0, 1, 2]] = 0.0
    if off.max() > 1e-6 * a.max():
        return None
    return perm  # type: ignore[return-value]


def interp_matrix(pos: np.ndarray, n: int, *, sigma: float = 0.0,
                  zero_outside: bool = False) -> sparse.csr_array:
    """Sparse (len(pos), n) float32 matrix: linear interpolation at ``pos``, after a Gaussian.

    Row r holds the weights that give the value at fractional index ``pos[r]`` of a 1-D signal
    of length ``n`` that was first smoothed by a Gaussian of ``sigma`` voxels (truncated at
    3 sigma, edge values repeated: ``scipy.ndimage.gaussian_filter1d(mode="nearest",
    truncate=3.0)``, less the taps under 1e-3 of the central one); ``sigma=0`` is plain linear
    interpolation. Every row has the same number of stored entries (a column may repeat at
    the edges; products sum the repeats).

    Args:
        pos: output positions in source voxel indices (1-D).
        n: source length (>= 1).
        sigma: Gaussian standard deviation in source voxels (0: no smoothing).
        zero_outside: rows of positions beyond the source are 0 (else edge values are used).
    """
    pos = np.asarray(pos, dtype=np.float64)
    if n == 1:
        lo = np.zeros(pos.size, dtype=np.intp)
        w1 = np.zeros(pos.size)
    else:
        c = np.clip(pos, 0.0, n - 1.0)
        lo = np.minimum(np.floor(c).astype(np.intp), n - 2)
        w1 = c - lo
    w0 = 1.0 - w1
    if zero_outside:
        outside = (pos < -_EDGE_TOL) | (pos > n - 1 + _EDGE_TOL)
        w0[outside] = 0.0
        w1[outside] = 0.0
    if sigma > 0:
        # (interpolation) o (Gaussian): row r spans columns lo-R .. lo+1+R (edge-clamped)
        radius = int(3.0 * sigma + 0.5)
        offs = np.arange(-radius, radius + 1)
        g = np.exp(-0.5 * (offs / sigma) ** 2)
        keep = g >= _MIN_TAP * g.max()  # e.g. sigma 0.26: taps +-1 weigh 4e-4, dropped
        g = g[keep] / g[keep].sum()
        radius = int(offs[keep].max())
    if sigma > 0 and radius > 0:
        band = np.arange(-radius, radius + 2)
        cols = np.clip(lo[:, None] + band, 0, n - 1)
        vals = w0[:, None] * np.append(g, 0.0) + w1[:, None] * np.insert(g, 0, 0.0)
    else:
        cols = np.empty((pos.size, 2), dtype=np.intp)
        cols[:, 0] = lo
        np.minimum(lo + 1, n - 1, out=cols[:, 1])
        vals = np.empty((pos.size, 2))
        vals[:, 0] = w0
        vals[:, 1] = w1
    per_row = cols.shape[1]
    indptr = np.arange(0, pos.size * per_row + 1, per_row, dtype=np.int32)
    return sparse.csr_array((vals.reshape(-1).astype(np.float32),
                             cols.reshape(-1).astype(np.int32), indptr), shape=(pos.size, n))


def _columns(w: sparse.csr_array) -> tuple[int, int]:
    """The range [first, last + 1) of columns that ``w`` reads."""
    return int(w.indices.min()), int(w.indices.max()) + 1


def _shifted(w: sparse.csr_array, first: int, last: int) -> sparse.csr_array:
    """``w`` restricted to its columns first .. last - 1 (all it reads), renumbered from 0."""
    if first == 0 and last == w.shape[1]:
        return w
    return sparse.csr_array((w.data, w.indices - np.int32(first), w.indptr),
                            shape=(w.shape[0], last - first))


def _block_diagonal(w: sparse.csr_array, reps: int) -> sparse.csr_array:
    """``reps`` copies of ``w`` on the diagonal of one CSR matrix."""
    nnz = w.nnz
    indptr = np.append((w.indptr[:-1] + nnz * np.arange(reps)[:, None]).ravel(), reps * nnz)
    indices = (w.indices + w.shape[1] * np.arange(reps)[:, None]).ravel()
    return sparse.csr_array((np.tile(w.data, reps), indices.astype(np.int32),
                             indptr.astype(np.int32)),
                            shape=(reps * w.shape[0], reps * w.shape[1]))


def _neighbour_pairs(w: sparse.csr_array) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """``(first, step, w0, w1)`` when row r of ``w`` is ``w0[r] * x[lo] + w1[r] * x[lo + 1]``
    (two stored entries, in that order) with ``lo = first + step * r``; else None."""
    rows = w.shape[0]
    if rows < 2 or w.nnz != 2 * rows or not (np.diff(w.indptr) == 2).all():
        return None
    lo, hi = w.indices[0::2], w.indices[1::2]
    prog = _progression(lo)
    if prog is None or not (hi == lo + 1).all():
        return None
    return prog[0], prog[1], w.data[0::2], w.data[1::2]


def _last_axis_pairs(y: np.ndarray, first: int, step: int, w0: np.ndarray,
                     w1: np.ndarray) -> np.ndarray:
    """``w0 * y[..., lo] + w1 * y[..., lo + 1]`` for ``lo = first + step * r`` (float32), as a
    sparse product sums it: ``(0 + w0 * lower) + w1 * upper``.

    The sum's order is that of the product's accumulation; adding 0 turns a -0.0 (both
    products -0.0) into the +0.0 the product's zero-initialised sum gives.
    """
    views = []
    for start in (first, first + 1):
        stop = start + step * w0.size
        views.append(y[..., start:stop if stop >= 0 else None:step])
    z = np.multiply(views[0], w0)
    z += np.multiply(views[1], w1)
    z += np.float32(0.0)
    return z


def apply_separable(a: np.ndarray, ops: list[sparse.csr_array], *,
                    source_order: bool = False, axes: tuple[int, int, int] = (2, 0, 1),
                    ) -> np.ndarray | tuple[np.ndarray, tuple]:
    """Apply ``ops[q]`` (n_out_q x n_q) along axis q of the 3-D float32 array ``a``.

    Three sparse x dense products over contiguous rows: axis 0 on (n0, n1 * n2), axis 1 as a
    block-diagonal matrix on (n0 * n1, n2) rows (whichever of the two shrinks the data more
    goes first), then axis 2 on the transpose of what is left (the only copy, of the smallest
    intermediate). Source slabs along axes 0 and 2 that no operator row reads are skipped.

    With ``source_order``, when every row of ``ops[2]`` reads two neighbours whose lower
    index steps evenly (plain interpolation onto a grid as fine as the source's, flipped or
    not), axis 2 is done instead with two strided views of what is
    left, in its own memory order: no transposed copy, and the result keeps the source's
    axis order. The values are the same, bit for bit. ``axes=(2, 1, 0)`` transposes what is
    left the other way round before the last product, so that the result holds the source
    axes in the order (2, 1, 0) (e.g. the output's order when that is RAS and the source
    is nibabel's transposed LAS/RAS), again with the same values.

    Returns:
        C-contiguous float32 array of shape (n_out_2, n_out_0, n_out_1): axes in the order
        (2, 0, 1), ``.transpose(1, 2, 0)`` views it in the source's axis order; with
        ``axes=(2, 1, 0)`` of shape (n_out_2, n_out_1, n_out_0). With ``source_order``:
        ``(array, held)``, the array's axes holding the source axes ``held``: (0, 1, 2)
        where the strided views were used, else ``axes``.
    """
    if axes not in ((2, 0, 1), (2, 1, 0)):
        raise ValueError(f"`axes` must be (2, 0, 1) or (2, 1, 0), got {axes}")
    x = np.asarray(a, dtype=np.float32)
    first, last = _columns(ops[0])
    x = np.ascontiguousarray(x[first:last])
    op0 = _shifted(ops[0], first, last)
    n0, n1, n2 = x.shape
    o0, o1, o2 = (op.shape[0] for op in ops)
    if o1 * n0 < o0 * n1:  # axis 1 shrinks more: do it first
        y = _block_diagonal(ops[1], n0) @ x.reshape(n0 * n1, n2)
        y = op0 @ y.reshape(n0, o1 * n2)
    else:
        y = op0 @ x.reshape(n0, n1 * n2)
        y = _block_diagonal(ops[1], o0) @ y.reshape(o0 * n1, n2)
    pairs = _neighbour_pairs(ops[2]) if source_order else None
    if pairs is not None:
        z = _last_axis_pairs(y.reshape(o0, o1, n2), *pairs)
        return z, (0, 1, 2)
    first, last = _columns(ops[2])
    if axes == (2, 0, 1):
        y = np.ascontiguousarray(y.reshape(o0 * o1, n2)[:, first:last].T)
    else:
        y = np.ascontiguousarray(y.reshape(o0, o1, n2)[:, :, first:last].transpose(2, 1, 0))
    z = (_shifted(ops[2], first, last) @ y.reshape(last - first, o0 * o1))
    z = z.reshape(o2, *((o0, o1) if axes == (2, 0, 1) else (o1, o0)))
    return (z, axes) if source_order else z


def _corner_counts(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """For each voxel (lower corner of a cell): how many of its cell's corners are in ``mask``.

    Returns:
        (uint8 counts of ``mask.shape``, meaningful where every upper corner exists; the
        number of corners of a cell: 8, or fewer along length-1 axes).
    """
    counts = np.ascontiguousarray(mask, dtype=np.uint8)
    full = 1
    for axis in range(3):
        if mask.shape[axis] > 1:
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            grown = counts.copy()
            grown[tuple(lo)] += counts[tuple(hi)]
            counts = grown
            full *= 2
    return counts, full


def _progression(idx: np.ndarray) -> tuple[int, int] | None:
    """``(first, step)`` when the 1-D integers ``idx`` (two or more) step evenly, step != 0."""
    if idx.size < 2:
        return None
    step = int(idx[1] - idx[0])
    if step == 0 or int(idx[-1] - idx[0]) != step * (idx.size - 1):
        return None
    if idx.size > 2 and not (np.diff(idx) == step).all():
        return None
    return int(idx[0]), step


def _pair_sum(x: np.ndarray, idx: np.ndarray, axis: int, out: np.ndarray | None = None,
              shift: int = 0) -> np.ndarray:
    """``x[idx] + (x[idx + 1] << shift)`` along ``axis`` (uint8 counts or corner codes).

    Evenly stepped ``idx`` (e.g. a source as fine as the output: unit steps) reads two strided
    views; other ``idx`` combine neighbours along the axis once, then gather.
    """
    prog = _progression(idx)
    if prog is None:
        n = x.shape[axis]
        lo = [slice(None)] * x.ndim
        hi = [slice(None)] * x.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        upper = x[tuple(hi)] << np.uint8(shift) if shift else x[tuple(hi)]
        pairs = np.add(x[tuple(lo)], upper)
        if out is None:
            return np.take(pairs, idx, axis=axis)
        out[...] = np.take(pairs, idx, axis=axis)
        return out
    first, step = prog
    views = []
    for start in (first, first + 1):
        stop = start + step * idx.size
        take = [slice(None)] * x.ndim
        take[axis] = slice(start, stop if stop >= 0 else None, step)
        views.append(x[tuple(take)])
    upper = views[1] << np.uint8(shift) if shift else views[1]
    return np.add(views[0], upper, out=out)


def _code_table(weights: list[tuple[np.ndarray, np.ndarray]], order: tuple[int, int, int],
                ) -> np.ndarray:
    """For a cell read with the same weights at every point (``weights[q]`` = (w0, w1), one
    float32 pair per axis): whether its blended value is >= 0.5, for each of the 256
    patterns of its corners (bit ``a0 + 2 * a1 + 4 * a2`` set when the corner at offset
    (a0, a1, a2) is in the mask), blended by :func:`_weighted8` exactly as a point is."""
    codes = np.arange(256)
    corners = ((codes[:, None] >> np.arange(8)) & 1).astype(np.uint8).reshape(-1)
    pair = [(np.full(256, w0, dtype=np.float32), np.full(256, w1, dtype=np.float32))
            for w0, w1 in weights]
    return _weighted8(corners, codes * 8, [1, 2, 4], pair, order) >= 0.5


def mask_separable(mask: np.ndarray, pos: list[np.ndarray], *,
                   axes: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """Trilinear interpolation of a boolean mask >= 0.5 on a separable grid; 0 beyond it.

    Equal to ``apply_separable`` of the mask as float32 with ``interp_matrix(..,
    zero_outside=True)`` operators, then ``>= 0.5``, at a fraction of the cost: a cell whose
    corners all agree needs no blending, so each output point's count of mask corners is
    summed one axis at a time (``m[lo] + m[lo + 1]``: strided views where the lower corners
    step evenly, as on a source as fine as the output) and only the thin shell of mixed
    cells at the mask's boundary is blended. A mixed cell is blended as the sparse products
    do it (the same float32 weights, the same sums in the same axis order), so that exact
    ties (value 0.5) fall on the same side.

    Args:
        mask: boolean array (n0, n1, n2).
        pos: for each axis q, the fractional source indices to read (1-D, any order).
        axes: the axis order of the result (``axes=(2, 0, 1)`` gives what
            ``.transpose(2, 0, 1)`` of the default would, already C-contiguous).

    Returns:
        Boolean C-contiguous array (len(pos[0]), len(pos[1]), len(pos[2])), its axes in the
        order ``axes``.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    n = mask.shape
    lows, fracs, beyond = [], [], []
    for q in range(3):
        p = np.asarray(pos[q], dtype=np.float64)
        c = np.clip(p, 0.0, n[q] - 1.0)
        lo = np.minimum(np.floor(c).astype(np.intp), max(n[q] - 2, 0))
        lows.append(lo)
        fracs.append(c - lo)  # float64; interp_matrix's weights are float32(1 - f), float32(f)
        beyond.append((p < -_EDGE_TOL) | (p > n[q] - 1 + _EDGE_TOL))
    # only the source cells the output reads: the box of their lower corners (+1)
    first = [int(lo.min()) for lo in lows]
    last = [min(int(lo.max()) + 2, n[q]) for q, lo in enumerate(lows)]
    # float32 weights of every point, as interp_matrix stores them
    w32 = [((1.0 - fracs[q]).astype(np.float32), fracs[q].astype(np.float32))
           for q in range(3)]
    # apply_separable's order: axis 1 first when it shrinks the data more, then 0, then 2
    n0 = last[0] - first[0]
    order = (1, 0, 2) if len(pos[1]) * n0 < len(pos[0]) * n[1] else (0, 1, 2)
    # The same weights at every point along each axis (an output grid as fine as the
    # source's): a mixed cell's value depends only on which of its corners are in the mask,
    # so each point gets the 8-bit code of its corners and a 256-entry table decides.
    coded = min(n) > 1 and all((w0 == w0[0]).all() and (w1 == w1[0]).all() for w0, w1 in w32)
    count = mask[first[0]:last[0], first[1]:last[1], first[2]:last[2]].view(np.uint8)
    full = 1
    out_shape = tuple(lows[a].size for a in axes)
    for q in range(3):
        idx = lows[q] - first[q]
        if n[q] == 1:  # no upper corner
            count = np.take(count, idx, axis=q)
            continue
        full *= 2
        dest = None
        if q == 2:  # the last sum writes in the order asked for
            dest = np.empty(out_shape, dtype=np.uint8).transpose(np.argsort(axes))
        count = _pair_sum(count, idx, q, out=dest, shift=(1 << q) if coded else 0)
    count = np.ascontiguousarray(count.transpose(axes))  # a view of dest, or a copy
    if coded:
        full = 255  # the code of a cell whose 8 corners are all in the mask
    out = count == full
    count -= 1  # uint8: 0 wraps to 255, so "mixed" (1 .. full - 1) is one comparison
    mixed = np.flatnonzero(count < full - 1)
    if mixed.size and coded:
        table = _code_table([(w0[0], w1[0]) for w0, w1 in w32], order)
        out.reshape(-1)[mixed] = table[1:][count.reshape(-1)[mixed]]  # count = code - 1
    elif mixed.size:
        where = np.unravel_index(mixed, out_shape)
        idx = [where[axes.index(q)] for q in range(3)]  # the point's index along source axis q
        strides = (n[1] * n[2], n[2], 1)
        steps = [strides[q] if n[q] > 1 else 0 for q in range(3)]
        base = (lows[0] * strides[0])[idx[0]]
        base += (lows[1] * strides[1])[idx[1]]
        base += lows[2][idx[2]]
        weights = [(w0[idx[q]], w1[idx[q]]) for q, (w0, w1) in enumerate(w32)]
        v = _weighted8(mask.reshape(-1).view(np.uint8), base, steps, weights, order)
        out.reshape(-1)[mixed] = v >= 0.5
    for q in range(3):
        if beyond[q].any():
            take = [slice(None)] * 3
            take[axes.index(q)] = beyond[q]
            out[tuple(take)] = False
    return out


#: Flat indices below this are exact in float32: the corner index is then summed in float32.
_FLOAT32_EXACT = 2**24


def _chunks(n: tuple[int, ...], m: np.ndarray, box: tuple[slice, ...], chunk: int,
            need_inside: bool = True):
    """Corner indices and weights of the output sub-box ``box``, a few slabs at a time.

    Yields ``(i0, base, fracs, inside)`` for output slabs ``i0 ..`` of the box: ``base``
    (flat index of each point's lower corner in a C-ordered source of shape ``n``, clamped
    so that all 8 corners exist), ``fracs`` (the three blend weights, float32) and
    ``inside`` (the point lies within the source, 1e-6 voxel tolerance; None unless
    ``need_inside``).

    Positions are float32 (``m`` rounded to float32). Along a source axis that the whole box
    maps well inside of (checked at the box's corners, 1e-3 voxel margin) the clamping steps
    are skipped, as they would change nothing; for a source of fewer than 2**24 voxels the
    flat index is summed in float32 (exact for such integers) and converted once.
    """
    size = tuple(b.stop - b.start for b in box)
    strides = (n[1] * n[2], n[2], 1)
    mm = m.astype(np.float32)
    j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[:, None]
    k = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, :]
    planes = [mm[q, 1] * j + mm[q, 2] * k + mm[q, 3] for q in range(3)]  # (o1, o2) each
    corners = np.array(np.meshgrid(*[(b.start, b.stop - 1) for b in box], [1.0],
                                   indexing="ij"), dtype=np.float64).reshape(4, -1)
    reach = np.asarray(m, dtype=np.float64)[:3] @ corners  # positions at the box's corners
    margin = 1e-3
    clip = [bool(reach[q].min() < margin or reach[q].max() > n[q] - 1 - margin)
            for q in range(3)]
    in_float = int(np.prod(n, dtype=np.int64)) < _FLOAT32_EXACT
    slabs = max(1, chunk // (size[1] * size[2]))
    for i0 in range(0, size[0], slabs):
        i = np.arange(box[0].start + i0, box[0].start + min(i0 + slabs, size[0]),
                      dtype=np.float32)[:, None, None]
        shape = (i.shape[0], *size[1:])
        acc = None if in_float else np.zeros(shape, dtype=np.intp)
        inside = np.ones(shape, dtype=bool) if need_inside else None
        fracs = []
        for q in range(3):
            c = planes[q] + mm[q, 0] * i
            if inside is not None:
                inside &= (c >= -_EDGE_TOL) & (c <= n[q] - 1 + _EDGE_TOL)
            if clip[q]:
                np.clip(c, 0, n[q] - 1, out=c)
            lo = np.floor(c)
            if clip[q] and n[q] > 1:
                np.minimum(lo, n[q] - 2, out=lo)
            c -= lo  # now the fraction
            fracs.append(c)
            if in_float:
                if strides[q] != 1:
                    lo *= np.float32(strides[q])
                if acc is None:
                    acc = lo
                else:
                    acc += lo
            else:
                idx = lo.astype(np.intp)
                idx *= strides[q]
                acc += idx
        base = acc.astype(np.intp) if in_float else acc
        yield i0, base, fracs, inside


def _steps(n: tuple[int, ...]) -> list[int]:
    """Flat-index offsets to the upper corner along each axis (0 for a length-1 axis)."""
    strides = (n[1] * n[2], n[2], 1)
    return [strides[q] if n[q] > 1 else 0 for q in range(3)]


def _full_box(shape: tuple[int, ...], where: tuple[slice, ...] | None) -> tuple[slice, ...]:
    return where or tuple(slice(0, s) for s in shape)


def sample_affine(sources: list[tuple[np.ndarray, bool]], m: np.ndarray,
                  shape: tuple[int, int, int], where: tuple[slice, ...] | None = None, *,
                  chunk: int = 32_768) -> list[np.ndarray]:
    """Trilinear samples of same-shape arrays at source index ``m @ (i, j, k, 1)``, any ``m``.

    The coordinate work (positions, corner indices, weights) is shared by all sources and
    done a few output slabs at a time (about ``chunk`` voxels), so that the ~40 vectorised
    steps per point run on cache-sized arrays (~2.5x faster than on the whole grid at once).

    Args:
        sources: ``(array, zero_outside)`` pairs; float32 arrays of one shape (n0, n1, n2).
        m: 4x4 output-index -> source-index matrix.
        shape: output grid.
        where: the output sub-box to compute (three slices with explicit start and stop);
            None for the whole grid.
        chunk: voxels per step.

    Returns:
        One float32 array per source, of ``shape`` (or of the sub-box's shape).
    """
    n = sources[0][0].shape
    box = _full_box(shape, where)
    size = tuple(b.stop - b.start for b in box)
    flats = [np.ravel(np.ascontiguousarray(a, dtype=np.float32)) for a, _ in sources]
    steps = _steps(n)
    outs = [np.empty(size, dtype=np.float32) for _ in sources]
    need_inside = any(z for _, z in sources)
    for i0, base, fracs, inside in _chunks(n, m, box, chunk, need_inside):
        for (_, zero_outside), flat, out in zip(sources, flats, outs):
            v = _blend8(flat, base, steps, fracs)
            if zero_outside:
                v *= inside
            out[i0:i0 + v.shape[0]] = v
    return outs


def _bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of the True voxels along each axis of a 3-D boolean array
    ((0, -1) along every axis when there is none)."""
    box = []
    for q in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != q)))
        box.append((int(hit[0]), int(hit[-1])) if hit.size else (0, -1))
    return box


def sample_masked(image: np.ndarray, mask: np.ndarray, m: np.ndarray,
                  shape: tuple[int, int, int], where: tuple[slice, ...] | None = None, *,
                  chunk: int = 32_768, mask_box: list[tuple[int, int]] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A boolean mask and an image on the same source grid, sampled at ``m @ (i, j, k, 1)``.

    The mask is interpolated trilinearly (0 beyond the source) and kept where >= 0.5; the
    image (edge values beyond the source) only inside that output mask, 0 elsewhere. Points
    whose 8 mask corners agree (all but a thin shell at the boundary) take the mask value
    without blending: a per-cell count of mask corners is looked up instead. The mixed points
    are blended in float64 (from the float32 positions), so that an exact tie (value 0.5) is
    kept, as ``map_coordinates`` in float64 keeps it, instead of rounding to either side.
    The corner counts are only computed around the mask's bounding box (every other cell
    has none).

    Args:
        mask_box: the mask's bounding box, (first, last) voxel index per axis, when the
            caller knows it (else it is found here); it must not be too small.

    Returns:
        (float32 image values, boolean mask), both of ``shape`` (or the sub-box's shape).
    """
    n = image.shape
    box = _full_box(shape, where)
    size = tuple(b.stop - b.start for b in box)
    flat = np.ravel(np.ascontiguousarray(image, dtype=np.float32))
    steps = _steps(n)
    # corners[c] = mask corners (0..8) of the cell whose lower corner is flat index c
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask_box is None:
        mask_box = _bounding_box(mask)
    # cells whose lower corner lies from one voxel before the box to its last voxel can
    # hold mask voxels: count those (the slice's last plane, beyond the box, counts 0)
    crop = tuple(slice(max(a - 1, 0), min(b + 2, n[q])) for q, (a, b) in enumerate(mask_box))
    corners = np.zeros(n, dtype=np.uint8)
    corners[crop], full = _corner_counts(mask[crop])
    corners = corners.reshape(-1)
    mask_u8 = mask.reshape(-1).view(np.uint8)
    values = np.zeros(size, dtype=np.float32)
    mask_o = np.empty(size, dtype=bool)
    # A point beyond the source is clamped onto an edge cell; when the mask keeps two voxels
    # away from every edge, such a cell has no mask corner, so no inside test is needed.
    need_inside = min(n) < 4 or any(a < 2 or b > n[q] - 3 for q, (a, b) in enumerate(mask_box))
    for i0, base, fracs, inside in _chunks(n, m, box, chunk, need_inside):
        count = np.take(corners, base)
        keep = count == full
        mixed = np.flatnonzero((count > 0) & ~keep)
        if mixed.size:
            b = base.reshape(-1)[mixed]
            v = _blend8(mask_u8, b, steps, [f.reshape(-1)[mixed].astype(np.float64)
                                            for f in fracs], dtype=np.float64)
            keep.reshape(-1)[mixed] = v >= 0.5
        if inside is not None:
            keep &= inside
        mask_o[i0:i0 + keep.shape[0]] = keep
        dst = values[i0:i0 + keep.shape[0]]
        dst[keep] = _blend8(flat, base[keep], steps, [f[keep] for f in fracs])
    return values, mask_o


def _blend8(flat: np.ndarray, base: np.ndarray, steps: list[int],
            fracs: list[np.ndarray], dtype: type = np.float32) -> np.ndarray:
    """Trilinear blend of the 8 corners ``flat[base + offset]`` with weights ``fracs``.

    ``flat`` is float32, or any real type (e.g. a uint8 mask) whose gathered corners are
    converted; the result (and the arithmetic) is ``dtype``, float32 unless asked for
    float64 (``fracs`` then float64 too).
    """
    def corner(off: int) -> np.ndarray:
        v = np.take(flat[off:], base)  # flat[base + off], without an index array per corner
        return v if v.dtype == dtype else v.astype(dtype)

    def blend(v: np.ndarray, w: np.ndarray, f: np.ndarray) -> np.ndarray:
        w -= v  # v + f * (w - v), in place
        w *= f
        v += w
        return v

    def along_z(off: int) -> np.ndarray:
        return blend(corner(off), corner(off + steps[2]), fracs[2])

    def along_yz(off: int) -> np.ndarray:
        return blend(along_z(off), along_z(off + steps[1]), fracs[1])

    return blend(along_yz(0), along_yz(steps[0]), fracs[0])


def _weighted8(flat: np.ndarray, base: np.ndarray, steps: list[int],
               weights: list[tuple[np.ndarray, np.ndarray]],
               order: tuple[int, int, int]) -> np.ndarray:
    """The 8 corners ``flat[base + offset]`` summed as ``apply_separable`` sums them.

    Along each axis (in ``order``) a pair of values becomes ``w0 * lower + w1 * upper`` in
    float32, with ``weights[q] = (w0, w1)`` (float32, one pair per point): the rounding of
    the sparse products, step for step.

    Returns:
        float32 values, one per point of ``base``.
    """
    offs = [0]
    for q in order:  # corner offsets, the first axis of ``order`` the fastest-varying
        offs = [o + s for s in (0, steps[q]) for o in offs]
    vals = [np.take(flat[off:], base).astype(np.float32) for off in offs]
    for q in order:
        w0, w1 = weights[q]
        vals = [w0 * lower + w1 * upper for lower, upper in zip(vals[0::2], vals[1::2])]
    return vals[0]
