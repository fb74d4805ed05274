"""Bring one T1 volume onto the common grid: RAS, isotropic spacing, fixed shape, z-scored brain.

The steps, each recorded in words in :attr:`PreprocessedVolume.actions`:

1. Anti-alias before downsampling, along the source's own voxel axes: where the target
   spacing is at least k times the voxel size along an axis (k integer), average blocks of k
   voxels along it; a residual non-integer factor r > 1.1 gets a Gaussian of sigma
   sqrt((r² - 1) / 12) voxels (the variance a box of width r adds). A 1 mm image thus
   becomes 2 mm by 2x2x2 block averages (measured: ~25 ms for 182x218x182, one core).
2. Reorient to the closest RAS orientation by axis flips and permutations (array views, no
   interpolation; like ``nibabel.as_closest_canonical``), done after step 1 so that it moves
   the smaller array.
3. Find the brain on that grid: Otsu threshold (256-bin histogram of a strided sample, upper
   end at the 99.9th percentile so rare bright voxels do not squash it), the largest
   6-connected component, holes filled. For a skull-stripped image this is the brain; for a
   whole-head image it is the head, which is what the centring and normalisation then use.
4. Output grid: ``config.shape`` voxels of ``config.spacing`` mm, axis-aligned in RAS world
   space and centred on the mask's centre of mass (unlike a bounding-box centre it does not
   depend on the source grid, so the same anatomy on any grid lands in the same place; the
   grid is not snapped to the source lattice for the same reason). Every output voxel centre
   is mapped to a source voxel position through ``inv(source affine) @ output affine`` and
   sampled trilinearly with edge values beyond the field of view: as three separable 1-D
   linear interpolations when that map is axis-aligned (the common case; identical to
   ``scipy.ndimage.affine_transform`` order 1 and ~10x faster), else with
   ``affine_transform`` itself, which handles anisotropic and oblique (rotated) grids alike.
   The mask is carried over the same way (0 beyond the field of view, kept where >= 0.5).
5. Normalise: z-score with the mean and standard deviation inside the mask on the output grid;
   0 outside the mask. float32 throughout (no float64 copy of a volume).

Features: ``brain_volume_ml`` (mask volume on the anti-aliased source grid, so not reduced by
cropping) and ``p01``/``p50``/``p99`` of the source intensities (after ``scl_slope``/
``scl_inter``, before normalisation) inside that mask.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from rankcore.errors import InputError, QuarantineError, ShapeError
from rankcore.mri.load import check_affine, check_voxels, load_volume
from rankcore.mri.types import PreprocessConfig, PreprocessedVolume

#: Fewer brain-mask voxels than this means no brain was found (`empty`).
_MIN_MASK_VOXELS = 27
#: The brain is reported as truncated when less than this fraction of it fits the output grid.
_KEEP_FRACTION = 0.97


def _mm(v: float) -> str:
    """Format a length in mm as in "1.0", "1.25", "0.94"."""
    s = f"{v:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _reorient(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute voxel axes to the closest RAS orientation; returns a view and its affine."""
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = nib.orientations.apply_orientation(data, ornt)
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def _antialias(data: np.ndarray, affine: np.ndarray, spacing: float,
               ) -> tuple[np.ndarray, np.ndarray, str]:
    """Low-pass along the axes that will be downsampled; returns data, its affine, a note."""
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    factors = spacing / voxel
    ks = [max(1, math.floor(f + 1e-6)) for f in factors]
    notes = []
    if max(ks) > 1:
        for axis, k in enumerate(ks):
            if k == 1:
                continue
            n = data.shape[axis] // k
            parts = []
            for j in range(k):
                take = [slice(None)] * 3
                take[axis] = slice(j, n * k, k)
                parts.append(data[tuple(take)])
            acc = parts[0] + parts[1]  # a new float32 array, half (or less) the size
            for part in parts[2:]:
                acc += part
            data = acc
        data *= np.float32(1.0 / np.prod(ks))
        # block voxel j covers source voxels k*j .. k*j+k-1: its centre is at k*j + (k-1)/2
        block = np.diag([*ks, 1]).astype(np.float64)
        block[:3, 3] = [(k - 1) / 2 for k in ks]
        affine = affine @ block
        notes.append(f"block average {'x'.join(map(str, ks))}")
    sigmas = [math.sqrt((r * r - 1) / 12) if r > 1.1 else 0.0
              for r in (f / k for f, k in zip(factors, ks))]
    if any(sigmas):
        data = ndimage.gaussian_filter(np.asarray(data, dtype=np.float32), sigmas, mode="nearest",
                                       truncate=3.0, output=np.float32)
        notes.append("gaussian sigma " + "/".join(f"{s:.2f}" for s in sigmas) + " vox")
    return data, affine, ", ".join(notes)


def _otsu_threshold(data: np.ndarray) -> float:
    """Otsu's threshold (maximal between-class variance) on a strided sample of ``data``."""
    flat = data.reshape(-1)
    stride = max(1, flat.size // 200_000)
    while stride > 1 and math.gcd(stride, data.shape[-1]) != 1:  # avoid sampling one plane
        stride += 1
    sample = flat[::stride]
    lo = float(flat.min())
    hi = float(np.percentile(sample, 99.9))
    if hi <= lo:
        hi = float(flat.max())
    hist, edges = np.histogram(sample, bins=256, range=(lo, hi))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 1e-12) & (w1 > 1e-12),
                           (m0[-1] * w0 - m0) ** 2 / (w0 * w1), 0.0)
    return float(edges[int(np.argmax(between)) + 1])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background pockets not connected to the volume's border (6-connectivity)."""
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(),
                             lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    outside = np.zeros(n + 1, dtype=bool)
    outside[border] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[lab]


def brain_mask(data: np.ndarray) -> np.ndarray:
    """Boolean brain (or head) mask: Otsu threshold, largest component, holes filled.

    Args:
        data: float array (x, y, z).

    Returns:
        Boolean array of the same shape.

    Raises:
        QuarantineError: `empty` when fewer than 27 voxels survive.
    """
    mask = data > _otsu_threshold(data)
    lab, n = ndimage.label(mask)
    if n == 0:
        raise QuarantineError("empty", "no voxel above the brain threshold")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    mask = lab == int(np.argmax(sizes))
    mask = _fill_holes(mask)
    if int(mask.sum()) < _MIN_MASK_VOXELS:
        raise QuarantineError("empty", f"no brain found (mask of {int(mask.sum())} voxels)")
    return mask


def _centre_of_mass(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index of a boolean mask (3 floats), from its three marginal counts."""
    total = float(mask.sum())
    return np.array([np.dot(np.arange(mask.shape[a]),
                            mask.sum(axis=tuple(b for b in range(3) if b != a)))
                     for a in range(3)], dtype=np.float64) / total


def _crop_pad(arr: np.ndarray, start: np.ndarray, shape: tuple[int, ...], fill) -> np.ndarray:
    """The box ``arr[start : start + shape]``, with ``fill`` where it leaves ``arr``."""
    out = np.full(shape, fill, dtype=arr.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(shape), arr.shape)
    if np.any(hi <= lo):
        return out
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[dst] = arr[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def _world_box(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """World-space bounding box (mm) of a voxel grid, voxel edges included."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape[:3]], indexing="ij"))
    pts = affine[:3, :3] @ corners.reshape(3, -1) + affine[:3, 3:4]
    return pts.min(axis=1), pts.max(axis=1)


def _obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0), -1, 1))).max())


def _lerp_axis(a: np.ndarray, axis: int, pos: np.ndarray, zero_outside: bool) -> np.ndarray:
    """Linear interpolation of ``a`` along one axis at fractional indices ``pos``.

    Beyond the edges the edge value is used, or 0 when ``zero_outside``.
    """
    n = a.shape[axis]
    i0 = np.floor(pos)
    frac = pos - i0
    i0 = i0.astype(np.intp)
    lo, hi = np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1)
    w0, w1 = (1.0 - frac).astype(np.float32), frac.astype(np.float32)
    if zero_outside:
        outside = (pos < -1e-6) | (pos > n - 1 + 1e-6)
        w0[outside] = 0.0
        w1[outside] = 0.0
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.take(a, lo, axis=axis)
    out *= w0.reshape(shape)
    out += np.take(a, hi, axis=axis) * w1.reshape(shape)
    return out


def _trilinear(a: np.ndarray, m: np.ndarray, shape: tuple[int, int, int],
               zero_outside: bool) -> np.ndarray:
    """Sample float32 ``a`` at source index ``m @ (i, j, k, 1)`` for each output voxel.

    Axis-aligned maps (diagonal ``m[:3, :3]``) are done as three separable 1-D linear
    interpolations (exactly trilinear, ~10x faster than scipy's generic path); others use
    ``scipy.ndimage.affine_transform`` (order 1; mode "nearest", or "constant" 0).
    """
    lin = m[:3, :3]
    if np.abs(lin - np.diag(np.diag(lin))).max() <= 1e-6 * np.abs(lin).max():
        out = a
        for axis in range(3):
            pos = lin[axis, axis] * np.arange(shape[axis]) + m[axis, 3]
            out = _lerp_axis(out, axis, pos, zero_outside)
        return out
    mode = "constant" if zero_outside else "nearest"
    return ndimage.affine_transform(a, lin, m[:3, 3], output_shape=shape, order=1,
                                    mode=mode, cval=0.0, prefilter=False, output=np.float32)


def _sample(data: np.ndarray, mask: np.ndarray, affine: np.ndarray, config: PreprocessConfig,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put ``data`` and ``mask`` on the output grid centred on the mask's centre of mass.

    Returns:
        (values float32 ``config.shape``, mask bool ``config.shape``, output affine 4x4)
    """
    s = config.spacing
    com = affine[:3, :3] @ _centre_of_mass(mask) + affine[:3, 3]
    out_affine = np.diag([s, s, s, 1.0])
    out_affine[:3, 3] = com - s * (np.asarray(config.shape) - 1) / 2
    m = np.linalg.solve(affine, out_affine)  # output voxel index -> source voxel index
    vals = _trilinear(data, m, config.shape, zero_outside=False)
    mask_o = _trilinear(mask.astype(np.float32), m, config.shape, zero_outside=True) >= 0.5
    return vals, mask_o, out_affine


def _preprocess(data: np.ndarray, affine: np.ndarray, config: PreprocessConfig, source: str,
                ) -> PreprocessedVolume:
    src_shape = tuple(int(n) for n in data.shape)
    src_orient = "".join(nib.aff2axcodes(affine))
    src_spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    actions = []
    # low-pass along the source's own axes first: contiguous memory, and the reorientation
    # below then moves an array up to 8x smaller
    small, small_affine, aa_note = _antialias(data, affine, config.spacing)
    small, small_affine = _reorient(small, small_affine)
    small = np.ascontiguousarray(small, dtype=np.float32)
    if src_orient != "RAS":
        actions.append(f"reoriented {src_orient}->RAS (axis flips/permutation)")
    try:
        mask = brain_mask(small)
    except QuarantineError as e:
        raise QuarantineError(e.category, f"{source}: {e}") from None
    vals, mask_o, out_affine = _sample(small, mask, small_affine, config)
    notes = ["trilinear"] + ([aa_note] if aa_note else [])
    oblique = _obliquity_deg(small_affine)
    if oblique > 0.01:
        notes.append(f"oblique {oblique:.1f} deg")
    src_txt = "x".join(_mm(v) for v in src_spacing)
    actions.append(f"resampled {src_txt}mm -> {_mm(config.spacing)}mm ({', '.join(notes)})")
    src_lo, src_hi = _world_box(affine, src_shape)
    out_lo, out_hi = _world_box(out_affine, config.shape)
    tol = 1e-3 * config.spacing
    out_txt = "x".join(map(str, config.shape))
    if np.any(src_lo < out_lo - tol) or np.any(src_hi > out_hi + tol):
        fov = "x".join(f"{v:.0f}" for v in src_hi - src_lo)
        actions.append(f"cropped {fov} mm field of view to {out_txt} voxels around the brain")
    if np.any(out_lo < src_lo - tol) or np.any(out_hi > src_hi + tol):
        actions.append(f"padded to {out_txt} voxels beyond the source field of view")
    voxel_ml = abs(float(np.linalg.det(small_affine[:3, :3]))) / 1000.0
    n_mask = int(mask.sum())
    n_out = int(mask_o.sum())
    kept = n_out * config.spacing**3 / 1000.0 / (n_mask * voxel_ml)
    if kept < _KEEP_FRACTION:
        actions.append(f"truncated brain: {100 * (1 - kept):.0f}% of the brain mask lies "
                       f"outside the {out_txt} grid")
    inside = vals[mask_o]
    mean = float(inside.mean(dtype=np.float64)) if n_out else 0.0
    sd = float(inside.std(dtype=np.float64)) if n_out > 1 else 0.0
    if not sd > 0:
        raise QuarantineError("empty", f"{source}: constant intensity inside the brain mask on "
                                       f"the output grid ({n_out} voxels)")
    vals -= np.float32(mean)
    vals *= np.float32(1.0 / sd)
    vals[~mask_o] = 0.0
    actions.append(f"normalised: z-score inside the brain mask (mean {mean:.4g}, sd {sd:.4g})")
    p01, p50, p99 = (float(v) for v in np.percentile(small[mask], [1, 50, 99]))
    return PreprocessedVolume(
        data=vals, affine=out_affine, spacing=(config.spacing,) * 3,
        source_orientation=src_orient, source_spacing=src_spacing, source_shape=src_shape,
        actions=actions,
        features={"brain_volume_ml": n_mask * voxel_ml, "p01": p01, "p50": p50, "p99": p99},
    )


def preprocess_volume(data: np.ndarray, affine: np.ndarray, config: PreprocessConfig, *,
                      source: str = "<array>") -> PreprocessedVolume:
    """Reorient, resample, crop/pad and normalise one volume (see the module docstring).

    Args:
        data: voxel array (x, y, z), or (x, y, z, 1); any real dtype (converted to float32).
        affine: 4x4 voxel-to-world matrix (mm).
        config: target spacing and shape.
        source: name used in error messages (e.g. the file).

    Returns:
        The volume on the target grid: float32 ``config.shape``, RAS, z-scored in the brain.

    Raises:
        ShapeError: ``data`` is not 3-D (or 4-D with one volume) or ``affine`` is not 4x4.
        InputError: ``data`` is not real-valued.
        QuarantineError: `bad_affine`, `nonfinite`, or `empty` (constant or no brain found).
    """
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ShapeError(f"`data` must be a 3-D volume (or 4-D with one volume), got shape "
                         f"{arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"`data` must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    affine = check_affine(affine, source)
    check_voxels(arr, source)
    return _preprocess(arr, affine, config, source)


def preprocess_file(path: str | Path, config: PreprocessConfig) -> PreprocessedVolume:
    """Load (with every header and voxel check of :func:`load_volume`) and preprocess one file.

    Raises:
        QuarantineError: any category of :func:`rankcore.mri.load.load_volume`, or `empty`.
    """
    data, affine, info = load_volume(path, config)
    return _preprocess(data, affine, config, str(info.path))


def describe(pv: PreprocessedVolume) -> str:
    """One log line: source grid, target grid, what was done, brain volume.

    Example: ``"src LAS 1.0x1.0x1.2mm 182x218x182 -> RAS 2.0mm 80x96x80; reoriented,
    resampled, cropped; brain 1350 ml"`` (normalisation always happens and is not listed).
    """
    verbs: list[str] = []
    for action in pv.actions:
        verb = action.split(" ", 1)[0].rstrip(":,")
        if verb != "normalised" and verb not in verbs:
            verbs.append(verb)
    src_sp = "x".join(_mm(v) for v in pv.source_spacing)
    src_shape = "x".join(map(str, pv.source_shape))
    out_shape = "x".join(map(str, pv.data.shape))
    vol = pv.features.get("brain_volume_ml", float("nan"))
    return (f"src {pv.source_orientation} {src_sp}mm {src_shape} -> RAS {_mm(pv.spacing[0])}mm "
            f"{out_shape}; {', '.join(verbs) or 'copied'}; brain {vol:.0f} ml")
