"""Bring one T1 volume onto the common grid: RAS, isotropic spacing, fixed shape, z-scored brain.

The steps, each recorded in words in :attr:`PreprocessedVolume.actions`:

1. Anti-alias before downsampling, along the source's own voxel axes: where the target
   spacing is at least k times the voxel size along an axis (k integer), average blocks of k
   voxels along it; a residual non-integer factor r > 1.1 gets a Gaussian of sigma
   sqrt((r² - 1) / 12) voxels (the variance a box of width r adds). A 1 mm image thus
   becomes 2 mm by 2x2x2 block averages. The Gaussian is not run as a filter of its own: it
   is folded into the interpolation weights of step 4 (where the map is axis-aligned).
2. No reorientation copy: the source stays in its own voxel order (nibabel's Fortran order
   is read as the C-ordered transpose), and the axis flips and permutations that bring it to
   RAS (like ``nibabel.as_closest_canonical``) are part of the map of step 4.
3. Find the brain on the anti-aliased grid (:mod:`rankcore.mri.brainmask`): for a
   skull-stripped image, every voxel above its constant background in the main connected
   component (the stripping mask as it is, CSF included); for any other image, the largest
   component above Otsu's threshold with its enclosed voxels filled (for a whole-head image
   the head, or the brain when the skull separates it from the scalp), which is what the
   centring and normalisation then use; the log says which.
4. Output grid: ``config.shape`` voxels of ``config.spacing`` mm, axis-aligned in RAS world
   space and centred on the mask's centre of mass (unlike a bounding-box centre it does not
   depend on the source grid, so the same anatomy on any grid lands in the same place; the
   grid is not snapped to the source lattice for the same reason). Every output voxel centre
   is mapped to a source voxel position through ``inv(source affine) @ output affine`` and
   sampled trilinearly with edge values beyond the field of view
   (:mod:`rankcore.mri.resample`): as three sparse 1-D maps when that map is axis-aligned
   (the common case, any orientation: ``scipy.ndimage.affine_transform`` order 1 after the
   Gaussian of step 1 gives the same values, ~20x slower), else (oblique, rotated grids)
   point by point. The mask is carried over the same way (0 beyond the field of view, kept
   where >= 0.5). Only the output sub-box that the mask's bounding box (+1 voxel) maps to
   is computed, and point by point only inside the mask: everything else is 0 after step 5.
5. Normalise: z-score with the mean and standard deviation inside the mask on the output grid;
   0 outside the mask. float32 throughout (no float64 copy of a volume).
6. With ``config.tissue``: :func:`rankcore.mri.tissue.tissue_of_output` bias-corrects the
   volume (N4), aligns the MNI template, classifies GM/WM/CSF and computes the tissue
   features; the volume is then z-scored again after the bias correction. Raises
   QuarantineError `tissue_failed` when the classification cannot be trusted.

Features: ``brain_volume_ml`` (mask volume on the anti-aliased source grid, so not reduced by
cropping) and ``p01``/``p50``/``p99`` of the source intensities (after ``scl_slope``/
``scl_inter``, before normalisation) inside that mask, from a strided sample of ~32k voxels.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from rankcore.errors import InputError, QuarantineError, ShapeError
from rankcore.mri.antialias import _antialias_note, _block_average, _smooth
from rankcore.mri.brainmask import (
    block_shape,
    brain_mask,
    foreground_threshold,
    mask_above,
    sample,
)
from rankcore.mri.header import check_affine, check_voxels
from rankcore.mri.load import load_volume
from rankcore.mri.resample import (
    apply_separable,
    axis_permutation,
    interp_matrix,
    mask_separable,
    sample_affine,
    sample_masked,
)
from rankcore.mri.types import PreprocessConfig, PreprocessedVolume
from rankcore.mri.whole_head import head_evidence, not_skull_stripped

__all__ = ["brain_mask", "describe", "preprocess_file", "preprocess_volume"]

#: The brain is reported as truncated when less than this fraction of it fits the output grid.
_KEEP_FRACTION = 0.97


def _mm(v: float) -> str:
    """Format a length in mm as in "1.0", "1.25", "0.94"."""
    s = f"{v:.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _axis_positions(m: np.ndarray, shape: tuple[int, ...], perm: tuple[int, ...],
                    ) -> list[np.ndarray]:
    """For an axis-aligned map: the source positions read along each source axis q."""
    pos: list[np.ndarray] = [np.empty(0)] * 3
    for d, q in enumerate(perm):
        pos[q] = m[q, d] * np.arange(shape[d]) + m[q, 3]
    return pos


def _trilinear(a: np.ndarray, m: np.ndarray, shape: tuple[int, int, int],
               zero_outside: bool, sigmas: list[float] | None = None) -> np.ndarray:
    """Sample float32 ``a`` at source index ``m @ (i, j, k, 1)`` for each output voxel.

    Axis-aligned maps go through three sparse 1-D maps (with the Gaussians ``sigmas``, in
    voxels along the source axes, folded in); others through
    :func:`~rankcore.mri.resample.sample_affine` (``sigmas`` must then be None or 0).
    Beyond the edges: edge values, or 0 when ``zero_outside``.

    Returns:
        C-contiguous float32 array of ``shape``.
    """
    sig = sigmas or [0.0, 0.0, 0.0]
    perm = axis_permutation(m[:3, :3])
    if perm is None:
        if any(sig):
            raise InputError(f"`sigmas` must be 0 for an oblique map, got {sig}")
        return sample_affine([(a, zero_outside)], m, shape)[0]
    pos = _axis_positions(m, shape, perm)
    ops = [interp_matrix(pos[q], a.shape[q], sigma=sig[q], zero_outside=zero_outside)
           for q in range(3)]
    return np.ascontiguousarray(apply_separable(a, ops).transpose(_raw_to_output(perm)))


def _raw_to_output(perm: tuple[int, ...], raw: tuple[int, ...] = (2, 0, 1),
                   ) -> tuple[int, int, int]:
    """Transpose that views a resampled array whose axes hold the source axes ``raw``
    (:func:`apply_separable`'s (2, 0, 1) by default) in output order."""
    return tuple(raw.index(q) for q in perm)  # type: ignore[return-value]


def _centre_and_box(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Centre of mass and bounding box of a non-empty C-contiguous boolean mask.

    Returns:
        (mean voxel index, 3 floats; (first, last) voxel index per axis), both from the
        mask's three marginal counts.
    """
    u = mask.view(np.uint8)
    plane = u.sum(axis=0, dtype=np.uint16 if mask.shape[0] < 65_536 else np.uint32)
    marginals = (np.array([np.count_nonzero(slab) for slab in mask]),  # 2x faster than axis=
                 plane.sum(axis=1), plane.sum(axis=0))
    total = float(marginals[0].sum())
    com = np.array([np.dot(np.arange(mask.shape[a], dtype=np.float64), marginals[a])
                    for a in range(3)]) / total
    box = []
    for mg in marginals:
        hit = np.flatnonzero(mg)
        box.append((int(hit[0]), int(hit[-1])))
    return com, box


def _resample(small: np.ndarray, mask: np.ndarray, m: np.ndarray, shape: tuple[int, int, int],
              sigmas: list[float], box: list[tuple[int, int]], source: str,
              ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[slice, ...]]:
    """Values and mask on the output grid, computed only where the mask can reach.

    Output voxels more than one source voxel beyond the mask's bounding box ``box`` have a
    mask value of exactly 0 (and are zeroed by the normalisation), so only the output
    sub-box that maps into the bounding box (+1 voxel) is computed.

    Returns:
        (values float32, mask bool, ``to_output``, ``where``): the arrays hold the output
        sub-box ``out[where]`` in the resampler's memory order; ``.transpose(to_output)``
        views them in output axis order.

    Raises:
        QuarantineError: `empty` when the mask lies entirely outside the output grid.
    """
    perm = axis_permutation(m[:3, :3])
    n = small.shape
    if perm is not None:
        pos = _axis_positions(m, shape, perm)
        rng = [(0, 0)] * 3
        for q in range(3):
            near = np.flatnonzero((pos[q] >= box[q][0] - 1) & (pos[q] <= box[q][1] + 1))
            if near.size == 0:
                raise QuarantineError("empty", f"{source}: the brain mask lies outside the "
                                               f"output grid")
            rng[q] = (int(near[0]), int(near[-1]) + 1)
            pos[q] = pos[q][rng[q][0]:rng[q][1]]
        ops = [interp_matrix(pos[q], n[q], sigma=sigmas[q]) for q in range(3)]
        # The memory order of the result (the source axis each of its axes holds), chosen so
        # that the output's last axis is innermost: the z-scoring then writes whole rows of
        # the output (for RAS from nibabel's transposed LAS/RAS/LPS, perm (2, 1, 0): the
        # output's own order). Two strided views for axis 2 when the output reads it last.
        if perm[2] == 2:
            vals, raw = apply_separable(small, ops, source_order=True)
        else:
            raw = (2, 1, 0) if perm[2] == 0 else (2, 0, 1)
            vals = apply_separable(small, ops, axes=raw)
        mask_o = mask_separable(mask, pos, axes=raw)  # the same memory order
        where = tuple(slice(*rng[q]) for q in perm)
        return vals, mask_o, _raw_to_output(perm, raw), where
    # oblique: the output box around the mask's bounding box (+1 voxel) mapped to the output
    corners = np.array(np.meshgrid(*[(b[0] - 1.0, b[1] + 1.0) for b in box], [1.0],
                                   indexing="ij")).reshape(4, -1)
    out_pts = np.linalg.solve(m, corners)[:3]
    lo_o = np.maximum(np.floor(out_pts.min(axis=1)).astype(int), 0)
    hi_o = np.minimum(np.ceil(out_pts.max(axis=1)).astype(int) + 1, shape)
    if np.any(hi_o <= lo_o):
        raise QuarantineError("empty", f"{source}: the brain mask lies outside the output grid")
    where = tuple(slice(int(a), int(b)) for a, b in zip(lo_o, hi_o))
    # Walk the output in the source's memory order (the output axis that moves most along
    # the source's last axis innermost): the gathers then read neighbouring memory (~2x
    # faster than crossing a source slab at every step).
    near = tuple(int(np.argmax(np.abs(m[:3, d]))) for d in range(3))
    perm = near if sorted(near) == [0, 1, 2] else (0, 1, 2)
    order = [perm.index(k) for k in range(3)]  # raw axis k = output axis order[k]
    m_raw = m[:, [*order, 3]]
    vals, mask_o = sample_masked(_smooth(small, sigmas), mask, m_raw,
                                 tuple(shape[d] for d in order), tuple(where[d] for d in order),
                                 mask_box=box)
    return vals, mask_o, perm, where


def _world_box(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """World-space bounding box (mm) of a voxel grid, voxel edges included."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape[:3]], indexing="ij"))
    pts = affine[:3, :3] @ corners.reshape(3, -1) + affine[:3, 3:4]
    return pts.min(axis=1), pts.max(axis=1)


def _obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0), -1, 1))).max())


def _zscore_(vals: np.ndarray, mask_o: np.ndarray, source: str,
             out: np.ndarray | None = None) -> tuple[float, float]:
    """z-score float32 ``vals`` inside boolean ``mask_o`` (same shape); 0 outside.

    In place, or into ``out`` (same shape; any strides) when given: the last step (the
    product with the mask) then writes there, so that no separate copy pass is needed;
    ``vals`` is left centred and scaled but unmasked.

    Returns:
        The mean and standard deviation used (sums accumulated in float64).
    """
    inside = vals[mask_o]
    n = inside.size
    mean = float(np.add.reduce(inside, dtype=np.float64)) / n if n else 0.0
    inside -= np.float32(mean)
    sd = math.sqrt(float(np.add.reduce(np.square(inside, out=inside), dtype=np.float64)) / n
                   ) if n > 1 else 0.0
    if not sd > 0:
        raise QuarantineError("empty", f"{source}: constant intensity inside the brain mask on "
                                       f"the output grid ({n} voxels)")
    vals -= np.float32(mean)
    vals *= np.float32(1.0 / sd)
    np.multiply(vals, mask_o, out=vals if out is None else out)
    return mean, sd


def _preprocess(data: np.ndarray, affine: np.ndarray, config: PreprocessConfig, source: str,
                orientation: str | None = None) -> PreprocessedVolume:
    src_shape = tuple(int(n) for n in data.shape)
    src_orient = orientation or "".join(nib.aff2axcodes(affine))
    src_spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    actions = []
    if src_orient != "RAS":
        actions.append(f"reoriented {src_orient}->RAS (axis flips/permutation)")
    transposed = not data.flags.c_contiguous and data.T.flags.c_contiguous
    if transposed:  # nibabel's Fortran-ordered array: its transpose is C-ordered (a view)
        data, affine = data.T, affine[:, [2, 1, 0, 3]]
    small, small_affine, ks, sigmas = _block_average(data, affine, config.spacing)
    small = np.ascontiguousarray(small, dtype=np.float32)
    values, stride = sample(small)  # ~32k voxels: threshold and feature statistics
    threshold, rule = foreground_threshold(values, float(values.min()), float(values.max()))
    small_voxel = np.linalg.norm(small_affine[:3, :3], axis=0)
    try:
        mask = mask_above(small, threshold, rule, block_shape(small_voxel, small.shape))
    except QuarantineError as e:
        raise QuarantineError(e.category, f"{source}: {e}") from None
    evidence = head_evidence(small, mask, threshold, small_voxel)
    if evidence.whole_head and not config.allow_whole_head:
        raise not_skull_stripped(evidence, source)
    s = config.spacing
    shape = config.shape
    centre, box = _centre_and_box(mask)
    com = small_affine[:3, :3] @ centre + small_affine[:3, 3]
    out_affine = np.diag([s, s, s, 1.0])
    out_affine[:3, 3] = com - s * (np.asarray(shape) - 1) / 2
    m = np.linalg.solve(small_affine, out_affine)  # output voxel index -> source voxel index
    # values and mask on the output sub-box around the brain, in the resampler's memory order
    vals, mask_o, to_output, where = _resample(small, mask, m, shape, sigmas, box, source)
    order = slice(None, None, -1) if transposed else slice(None)  # notes in the file's axes
    note = _antialias_note(ks[order], sigmas[order])
    notes = ["trilinear"] + ([note] if note else [])
    oblique = _obliquity_deg(small_affine)
    if oblique > 0.01:
        notes.append(f"oblique {oblique:.1f} deg")
    src_txt = "x".join(_mm(v) for v in src_spacing)
    actions.append(f"resampled {src_txt}mm -> {_mm(s)}mm ({', '.join(notes)})")
    src_lo, src_hi = _world_box(affine, data.shape)
    out_lo, out_hi = _world_box(out_affine, shape)
    tol = 1e-3 * s
    out_txt = "x".join(map(str, shape))
    if np.any(src_lo < out_lo - tol) or np.any(src_hi > out_hi + tol):
        fov = "x".join(f"{v:.0f}" for v in src_hi - src_lo)
        actions.append(f"cropped {fov} mm field of view to {out_txt} voxels around the brain")
    if np.any(out_lo < src_lo - tol) or np.any(out_hi > src_hi + tol):
        actions.append(f"padded to {out_txt} voxels beyond the source field of view")
    voxel_ml = abs(float(np.linalg.det(small_affine[:3, :3]))) / 1000.0
    n_mask = int(np.count_nonzero(mask))
    n_out = int(np.count_nonzero(mask_o))
    kept = n_out * s**3 / 1000.0 / (n_mask * voxel_ml)
    if kept < _KEEP_FRACTION:
        actions.append(f"truncated brain: {100 * (1 - kept):.0f}% of the brain mask lies "
                       f"outside the {out_txt} grid")
    out = np.zeros(shape, dtype=np.float32)
    # out's sub-box viewed in the resampler's memory order (the statistics keep its order)
    mean, sd = _zscore_(vals, mask_o, source,
                        out=out[where].transpose(np.argsort(to_output)))
    how = ("skull-stripped: voxels above the constant background" if rule == "background"
           else f"not skull-stripped: voxels above Otsu threshold {threshold:.4g}")
    if evidence.whole_head:  # only with config.allow_whole_head
        actions.append(f"whole head kept as it is (allow_whole_head): {evidence.describe()}")
    tissue = None
    if config.tissue:  # bias correction, then the stored volume is z-scored again
        from rankcore.mri.tissue import tissue_of_output

        full = np.zeros(shape, dtype=bool)
        full[where] = mask_o.transpose(to_output)
        tissue = tissue_of_output(out, full, mean, sd, out_affine, config, source)
        actions.append(tissue.summary)
        how += "; after N4 bias correction"
    actions.append(f"normalised: z-score inside the brain mask ({how}; mean {mean:.4g}, "
                   f"sd {sd:.4g})")
    in_mask = values[mask.reshape(-1)[::stride]]
    if in_mask.size < 100:  # a tiny brain: use every voxel
        in_mask = small[mask]
    p01, p50, p99 = (float(v) for v in np.percentile(in_mask, [1, 50, 99]))
    return PreprocessedVolume(
        data=out, affine=out_affine, spacing=(s,) * 3,
        source_orientation=src_orient, source_spacing=src_spacing, source_shape=src_shape,
        actions=actions,
        features={"brain_volume_ml": n_mask * voxel_ml, "p01": p01, "p50": p50, "p99": p99},
        tissue=None if tissue is None else tissue.probabilities,
        tissue_features=None if tissue is None else tissue.features,
        tissue_seconds=None if tissue is None else tissue.seconds,
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


def preprocess_file(path: str | Path, config: PreprocessConfig, *,
                    raw: bytes | None = None) -> PreprocessedVolume:
    """Load (with every header and voxel check of :func:`load_volume`) and preprocess one file.

    ``raw``: the file's bytes when the caller has read them already (the ingest hashes them
    first); decoded instead of reading ``path`` again.

    Raises:
        QuarantineError: any category of :func:`rankcore.mri.load.load_volume`, or `empty`.
    """
    data, affine, info = load_volume(path, config, raw=raw)
    del raw  # the file's bytes are not needed past decoding
    return _preprocess(data, affine, config, str(info.path), info.orientation)


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
    line = (f"src {pv.source_orientation} {src_sp}mm {src_shape} -> RAS {_mm(pv.spacing[0])}mm "
            f"{out_shape}; {', '.join(verbs) or 'copied'}; brain {vol:.0f} ml")
    if pv.tissue_seconds:
        line += "; tissue CPU s " + ", ".join(f"{k} {v:.2f}" for k, v in
                                             pv.tissue_seconds.items())
    return line
