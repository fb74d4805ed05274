"""Is a T1 image skull-stripped? Evidence of a whole head (scalp, skull) around the brain.

brainrank expects a brain-extracted T1. A whole-head image otherwise goes through
preprocessing with the head (or a brain cut out by Otsu's threshold) as its mask, and its
features are those of a head; :func:`check_skull_stripped` sets it aside instead
(quarantine category ``not_skull_stripped``) with a message that says how to strip it.

Evidence, measured on a copy block-averaged to voxels of 2 mm, or coarser (4, 6, ... mm) until
the grid holds at most 2^18 voxels (so the cost does not grow with the source resolution;
about 4 mm for a whole-head field of view):

- ``head_ml``: the volume of the foreground (voxels above the brain-mask threshold, in
  components of at least ``_MIN_PART_ML``, plus the brain mask itself) with its enclosed
  voxels filled. An adult brain's stripping mask, CSF included, holds 1.0-2.0 L; a head
  3-5 L.
- the shell profile: the same foreground closed over ``_CLOSE_MM`` (bridging a dark skull
  between scalp and brain) and filled is the head; the median intensity of its 2 mm layers
  (or one voxel, when coarser) at increasing depth below its surface. A stripped brain's
  profile starts at cortex and stays at or above it (GM, then WM); a head's starts bright
  (scalp fat) and dips into the dark skull and CSF before the brain. ``shell_contrast`` =
  how far the darkest layer down to ``_GAP_MM`` lies below both an outer layer (within
  ``_OUTER_MM``) and the interior (deeper than ``_INNER_MM``), over the interior's median,
  the largest over the outer layers: below 0 for a T1 brain (and about 0 for an inverted,
  T2-like one, whose dark WM is its interior), positive for a head. It does not depend on
  the head's size.
- ``outside_ml``: foreground outside the (1-voxel-dilated) brain mask, in components of at
  least ``_MIN_PART_ML`` (the scalp when Otsu's threshold isolated the brain; ~0 after
  skull stripping). Reported, not used by the verdict on its own.

The verdict: not skull-stripped when ``head_ml > MAX_BRAIN_ML`` or ``shell_contrast >
MAX_SHELL_CONTRAST``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rankcore.errors import QuarantineError

__all__ = [
    "MAX_BRAIN_ML",
    "MAX_SHELL_CONTRAST",
    "STRIP_ADVICE",
    "HeadEvidence",
    "check_skull_stripped",
    "head_evidence",
    "not_skull_stripped",
]

#: A foreground enclosing more than this (ml) is not a brain.
MAX_BRAIN_ML = 3300.0
#: A bright outer layer over a dark one, by more than this fraction of the interior.
MAX_SHELL_CONTRAST = 0.15
#: What to do about it (part of the quarantine message).
STRIP_ADVICE = ("skull-strip it first (e.g. HD-BET, FreeSurfer's mri_synthstrip, FSL's bet) "
                "and ingest the brain-extracted image, or pass --allow-whole-head to "
                "process it as it is")
_MIN_PART_ML = 5.0
_CLOSE_MM = 10.0
_LAYER_MM = 2.0
_OUTER_MM = 6.0
_GAP_MM = 20.0
_INNER_MM = 26.0
_GRID_MM = 2.0
#: ... coarser (4, 6, ... mm) until the grid holds at most this many voxels.
_MAX_VOXELS = 1 << 18


@dataclass(frozen=True)
class HeadEvidence:
    """What :func:`head_evidence` measured (see the module docstring).

    Attributes:
        head_ml: volume (ml) enclosed by the foreground.
        outside_ml: foreground volume (ml) outside the brain mask.
        shell_contrast: depth of a dark layer under a bright outer layer, relative to the
            interior intensity.
    """

    head_ml: float
    outside_ml: float
    shell_contrast: float

    @property
    def whole_head(self) -> bool:
        """True when the evidence says the image is not skull-stripped."""
        return self.head_ml > MAX_BRAIN_ML or self.shell_contrast > MAX_SHELL_CONTRAST

    def describe(self) -> str:
        """``"foreground encloses 3870 ml, shell contrast 0.92, 1450 ml outside the mask"``."""
        return (f"foreground encloses {self.head_ml:.0f} ml, shell contrast "
                f"{self.shell_contrast:.2f}, {self.outside_ml:.0f} ml outside the brain mask")


def _coarse(data: np.ndarray, mask: np.ndarray, voxel_mm: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block means of ``data`` and ``mask`` (> 0.5) over blocks of ~2 mm, or 4, 6, ... mm
    until at most ``_MAX_VOXELS`` remain; their voxel size."""
    grid = _GRID_MM
    while True:
        ks = [max(1, math.floor(grid / v + 1e-6)) for v in voxel_mm]
        if math.prod(s // k for s, k in zip(data.shape, ks)) <= _MAX_VOXELS:
            break
        grid += _GRID_MM
    if max(ks) == 1:
        return data, mask, voxel_mm
    n = [s // k for s, k in zip(data.shape, ks)]
    crop = tuple(slice(0, a * k) for a, k in zip(n, ks))
    shape = (n[0], ks[0], n[1], ks[1], n[2], ks[2])
    d = data[crop].reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32)
    m = mask[crop].reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32) > 0.5
    return d, m, voxel_mm * np.asarray(ks)


def _big_parts(fg: np.ndarray, min_voxels: float) -> np.ndarray:
    """Voxels of ``fg`` in 26-connected components of at least ``min_voxels``."""
    lab, n = ndimage.label(fg, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return fg
    sizes = np.bincount(lab.reshape(-1))
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _closed_filled(region: np.ndarray, voxel: np.ndarray, radius_mm: float) -> np.ndarray:
    """Morphological closing by a cube of half-side ``radius_mm`` (chessboard distances, int32:
    no float64 array of the grid), then enclosed voxels filled."""
    r = max(1, round(radius_mm / float(voxel.mean())))
    big = np.pad(region, r + 1)
    grown = ndimage.distance_transform_cdt(~big, metric="chessboard") <= r
    closed = ndimage.distance_transform_cdt(grown, metric="chessboard") > r
    closed |= big
    inner = tuple(slice(r + 1, r + 1 + s) for s in region.shape)
    return ndimage.binary_fill_holes(closed)[inner]


def _shell_contrast(data: np.ndarray, head: np.ndarray, voxel: np.ndarray) -> float:
    """min(outer layer, interior) - darkest layer beneath, over the interior median; the
    largest over the outer layers (negative when every layer beneath is brighter; 0 when
    undefined)."""
    # depth below the surface (mm): chessboard voxel layers (1 = the surface layer)
    depth = ndimage.distance_transform_cdt(head, metric="chessboard").astype(np.float32)
    depth *= np.float32(voxel.mean())
    step = max(_LAYER_MM, float(voxel.mean()))
    layer = np.floor((depth[head] - 1e-3) / step).astype(np.intp)
    vals = data[head]
    n_layers = int(_GAP_MM // step)
    medians = []
    for i in range(n_layers):
        v = vals[layer == i]
        medians.append(float(np.median(v)) if v.size else math.nan)
    deep = vals[depth[head] > _INNER_MM]
    if deep.size < 50:  # a small head or brain: its inner half
        deep = vals[depth[head] > 0.5 * float(depth.max())]
    interior = float(np.median(deep)) if deep.size else math.nan
    n_outer = max(1, round(_OUTER_MM / step))
    best = -math.inf
    for i in range(min(n_outer, n_layers)):
        beneath = [m for m in medians[i + 1:] if not math.isnan(m)]
        if math.isnan(medians[i]) or not beneath:
            continue
        gap = min(beneath)  # dark under the outer layer AND under the interior: a skull
        best = max(best, min(medians[i] - gap, interior - gap))
    if not interior > 0 or best == -math.inf:
        return 0.0
    return best / interior


def head_evidence(data: np.ndarray, mask: np.ndarray, threshold: float,
                  voxel_mm) -> HeadEvidence:
    """Measure the whole-head evidence of one volume (see the module docstring).

    Args:
        data: float (X, Y, Z) intensities (any scale; the source's, before normalisation).
        mask: boolean (X, Y, Z) brain mask found by :mod:`rankcore.mri.brainmask`.
        threshold: its foreground threshold (voxels ``> threshold`` are foreground).
        voxel_mm: voxel size (mm) along each axis.

    Returns:
        HeadEvidence.
    """
    voxel = np.asarray(voxel_mm, dtype=np.float64)
    d, m, voxel = _coarse(np.asarray(data, dtype=np.float32), np.asarray(mask, dtype=bool),
                          voxel)
    voxel_ml = float(np.prod(voxel)) / 1000.0
    fg = _big_parts(d > threshold, _MIN_PART_ML / voxel_ml)
    near = ndimage.binary_dilation(m)
    outside_ml = float(np.count_nonzero(fg & ~near)) * voxel_ml
    head_ml = float(np.count_nonzero(ndimage.binary_fill_holes(fg | m))) * voxel_ml
    head = _closed_filled(fg | m, voxel, _CLOSE_MM)
    return HeadEvidence(head_ml=head_ml, outside_ml=outside_ml,
                        shell_contrast=_shell_contrast(d, head, voxel))


def check_skull_stripped(data: np.ndarray, mask: np.ndarray, threshold: float, voxel_mm,
                         source: str) -> HeadEvidence:
    """:func:`head_evidence`, raising when it says the image is a whole head.

    Raises:
        QuarantineError: ``not_skull_stripped``; the message names ``source``, what was
            measured, and what to do.
    """
    ev = head_evidence(data, mask, threshold, voxel_mm)
    if ev.whole_head:
        raise not_skull_stripped(ev, source)
    return ev


def not_skull_stripped(evidence: HeadEvidence, source: str) -> QuarantineError:
    """The ``not_skull_stripped`` quarantine error of ``source``: what was measured, what to do."""
    return QuarantineError(
        "not_skull_stripped",
        f"{source}: looks like a whole head, not a skull-stripped brain "
        f"({evidence.describe()}; a brain encloses at most {MAX_BRAIN_ML:.0f} ml and has no "
        f"bright shell over a dark skull, contrast <= {MAX_SHELL_CONTRAST}); {STRIP_ADVICE}")


def volume_evidence(data: np.ndarray, affine: np.ndarray, spacing: float = 2.0) -> HeadEvidence:
    """:func:`head_evidence` of a whole volume, found as preprocessing finds it.

    The volume is block-averaged towards ``spacing`` mm (:mod:`rankcore.mri.antialias`), its
    brain mask found (:mod:`rankcore.mri.brainmask`), and the evidence measured.

    Args:
        data: real (X, Y, Z) voxel array.
        affine: its 4x4 voxel-to-world affine (mm).
        spacing: the preprocessing's target spacing (mm).

    Raises:
        QuarantineError: `empty` when no brain is found.
    """
    from rankcore.mri.antialias import _block_average
    from rankcore.mri.brainmask import block_shape, foreground_threshold, mask_above, sample

    small, small_affine, _, _ = _block_average(np.asarray(data, dtype=np.float32), affine,
                                               spacing)
    small = np.ascontiguousarray(small, dtype=np.float32)
    values, _ = sample(small)
    threshold, rule = foreground_threshold(values, float(values.min()), float(values.max()))
    voxel = np.linalg.norm(small_affine[:3, :3], axis=0)
    mask = mask_above(small, threshold, rule, block_shape(voxel, small.shape))
    return head_evidence(small, mask, threshold, voxel)
