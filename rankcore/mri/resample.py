"""Resampling kernels of :mod:`rankcore.mri.preprocess`: per-axis linear maps and point lookups.

Every map here takes a 4x4 matrix ``m`` that sends an output voxel index (i, j, k, 1) to a
(fractional) source voxel index, and samples a float32 source at those positions.

- Axis-aligned maps (each output axis reads one source axis: flips, permutations and
  anisotropic zooms, no rotation; :func:`axis_permutation`) are separable: three 1-D linear
  maps, each a sparse matrix (:func:`interp_matrix`, n_out x n_in) applied along one axis
  (:func:`apply_separable`). A matrix holds linear interpolation at the output positions and,
  optionally, a Gaussian low-pass along that axis before it (anti-aliasing), so the filter
  costs nothing extra: each output value is a few multiply-adds (2 for plain interpolation).
  On a 2 mm head this is ~5x faster than the same interpolation written with ``np.take``, and
  ~10x faster than ``scipy.ndimage.affine_transform`` (whose order-1 result it reproduces).
- Other maps (oblique, rotated grids) are sampled point by point (:func:`sample_affine`:
  eight gathers and seven linear blends per point, vectorised over a few output slabs at a
  time); several sources on one grid (an image and its mask) share the coordinate work.

Edges: ``zero_outside=False`` extends the source by its edge values (scipy mode "nearest");
``zero_outside=True`` gives 0 at positions more than 1e-6 voxel beyond the first or last
voxel centre (scipy mode "constant" with cval 0).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

#: Positions this far (voxels) beyond the first/last voxel centre still count as inside.
_EDGE_TOL = 1e-6


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
    truncate=3.0)``); ``sigma=0`` is plain linear interpolation. Every row has the same number
    of stored entries (a column may repeat; products sum the repeats).

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
    cols = np.stack([lo, np.minimum(lo + 1, n - 1)], axis=1)
    vals = np.stack([w0, w1], axis=1)
    if sigma > 0:
        radius = int(3.0 * sigma + 0.5)
        offs = np.arange(-radius, radius + 1)
        g = np.exp(-0.5 * (offs / sigma) ** 2)
        g /= g.sum()
        cols = np.clip(cols[..., None] + offs, 0, n - 1)
        vals = vals[..., None] * g
    per_row = vals[0].size if pos.size else 0
    indptr = np.arange(pos.size + 1, dtype=np.int32) * per_row
    return sparse.csr_array((vals.reshape(-1).astype(np.float32),
                             cols.reshape(-1).astype(np.int32), indptr), shape=(pos.size, n))


def _block_diagonal(w: sparse.csr_array, reps: int) -> sparse.csr_array:
    """``reps`` copies of ``w`` on the diagonal of one CSR matrix."""
    nnz = w.nnz
    indptr = np.append((w.indptr[:-1] + nnz * np.arange(reps)[:, None]).ravel(), reps * nnz)
    indices = (w.indices + w.shape[1] * np.arange(reps)[:, None]).ravel()
    return sparse.csr_array((np.tile(w.data, reps), indices.astype(np.int32),
                             indptr.astype(np.int32)),
                            shape=(reps * w.shape[0], reps * w.shape[1]))


def apply_separable(a: np.ndarray, ops: list[sparse.csr_array]) -> np.ndarray:
    """Apply ``ops[q]`` (n_out_q x n_q) along axis q of the 3-D float32 array ``a``.

    Three sparse x dense products over contiguous rows: axis 0 on (n0, n1 * n2), axis 1 as a
    block-diagonal matrix on (n_out_0 * n1, n2), axis 2 on the transpose of what is left
    (the only copy, of the smallest intermediate).

    Returns:
        C-contiguous float32 array of shape (n_out_2, n_out_0, n_out_1): axes in the order
        (2, 0, 1); ``.transpose(1, 2, 0)`` views it in the source's axis order.
    """
    x = np.ascontiguousarray(a, dtype=np.float32)
    n0, n1, n2 = x.shape
    o0, o1, o2 = (op.shape[0] for op in ops)
    y = ops[0] @ x.reshape(n0, n1 * n2)
    y = _block_diagonal(ops[1], o0) @ y.reshape(o0 * n1, n2)
    z = ops[2] @ np.ascontiguousarray(y.T)
    return z.reshape(o2, o0, o1)


def sample_affine(sources: list[tuple[np.ndarray, bool]], m: np.ndarray,
                  shape: tuple[int, int, int], chunk: int = 32_768) -> list[np.ndarray]:
    """Trilinear samples of same-shape arrays at source index ``m @ (i, j, k, 1)``, any ``m``.

    The coordinate work (positions, corner indices, weights) is shared by all sources and
    done a few output slabs at a time (about ``chunk`` voxels), so that the ~40 vectorised
    steps per point run on cache-sized arrays (~2.5x faster than on the whole grid at once).

    Args:
        sources: ``(array, zero_outside)`` pairs; float32 arrays of one shape (n0, n1, n2).
        m: 4x4 output-index -> source-index matrix.
        shape: output grid.
        chunk: voxels per step.

    Returns:
        One float32 array of ``shape`` per source.
    """
    n = sources[0][0].shape
    flats = [np.ravel(np.ascontiguousarray(a, dtype=np.float32)) for a, _ in sources]
    strides = (n[1] * n[2], n[2], 1)
    steps = [strides[q] if n[q] > 1 else 0 for q in range(3)]
    mm = m.astype(np.float32)
    j = np.arange(shape[1], dtype=np.float32)[:, None]
    k = np.arange(shape[2], dtype=np.float32)[None, :]
    planes = [mm[q, 1] * j + mm[q, 2] * k + mm[q, 3] for q in range(3)]  # (o1, o2) each
    outs = [np.empty(shape, dtype=np.float32) for _ in sources]
    any_zero = any(z for _, z in sources)
    slabs = max(1, chunk // (shape[1] * shape[2]))
    for i0 in range(0, shape[0], slabs):
        i = np.arange(i0, min(i0 + slabs, shape[0]), dtype=np.float32)[:, None, None]
        base = np.zeros((i.shape[0], *shape[1:]), dtype=np.intp)
        inside = np.ones(base.shape, dtype=bool) if any_zero else None
        fracs = []
        for q in range(3):
            c = planes[q] + mm[q, 0] * i
            if inside is not None:
                inside &= (c >= -_EDGE_TOL) & (c <= n[q] - 1 + _EDGE_TOL)
            np.clip(c, 0, n[q] - 1, out=c)
            lo = np.floor(c)
            if n[q] > 1:
                np.minimum(lo, n[q] - 2, out=lo)
            c -= lo  # now the fraction
            fracs.append(c)
            idx = lo.astype(np.intp)
            idx *= strides[q]
            base += idx
        for (_, zero_outside), flat, out in zip(sources, flats, outs):
            v = _blend8(flat, base, steps, fracs)
            if zero_outside:
                v *= inside
            out[i0:i0 + i.shape[0]] = v
    return outs


def _blend8(flat: np.ndarray, base: np.ndarray, steps: list[int],
            fracs: list[np.ndarray]) -> np.ndarray:
    """Trilinear blend of the 8 corners ``flat[base + offset]`` with weights ``fracs``."""
    idx = np.empty_like(base)

    def corner(off: int) -> np.ndarray:
        np.add(base, off, out=idx)
        return np.take(flat, idx)

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
