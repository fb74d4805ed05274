"""Brain (or head) mask of a T1 volume: foreground threshold, then its main component.

Two kinds of input, told apart from a strided sample of about 32k voxels:

- skull-stripped (the project's simulated cohort, BET/FreeSurfer/HD-BET outputs): at least
  5 % of the voxels equal the image minimum exactly (the background the stripping tool
  wrote) and the intensities then jump: fewer than 1 % of the other voxels lie within 5 % of
  the range (up to their 99th percentile) above it. The stripping mask is taken as it is:
  the brain is every voxel above the background, dark CSF included, in the main connected
  component; nothing is filled. Otsu's threshold would cut such an image between CSF and
  grey matter once the background fills most of the field of view: on the simulated cohort
  it lost 4-10 % of the brain (more at sites with dark CSF), and the loss depended on the
  field of view. The main component is found on a grid of ~4 mm blocks (one labelling of
  ~1/8 of the voxels, within the bounding box of the occupied blocks): blocks holding
  foreground voxels, 6-connected; the main component is the one with the most foreground
  voxels, and the foreground voxels of other blocks are dropped (a speck closer than a
  block to the brain is kept).
- anything else (whole head, noisy or soft-edged background): Otsu's threshold (256-bin
  histogram of the sample, upper end at its 99.9th percentile so rare bright voxels do not
  squash it), the largest 6-connected component of the voxels above it, and the voxels it
  encloses (background pockets not connected to the volume's border), all at the voxel
  level. For a whole-head image this is the head, or the brain when the dark skull
  separates it from the scalp; the log line says such an image did not look skull-stripped.

Known limitation: a whole-head image whose background is exactly 0 (masked by the scanner or
the converter) and whose dark skull gap lies above 5 % of the range passes the skull-stripped
test, so the whole head is taken as the brain (``brain_volume_ml`` ~2x too large).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from rankcore.errors import QuarantineError

#: Fewer brain-mask voxels than this means no brain was found (`empty`).
MIN_MASK_VOXELS = 27
#: Sample size (voxels) for the intensity statistics.
_SAMPLE = 32_768
#: Skull-stripped: at least this fraction of voxels at exactly the minimum ...
_BG_FRACTION = 0.05
#: ... and fewer than this fraction of the other voxels within _STEP of the range above it.
_DIM_FRACTION = 0.01
_STEP = 0.05
#: Size (mm) of the blocks on which the main component of a skull-stripped image is found.
_BLOCK_MM = 4.0


def sample(data: np.ndarray) -> tuple[np.ndarray, int]:
    """A strided sample of about 32k voxels of C-contiguous ``data``, and its stride.

    The stride is coprime with the last dimension, so the samples do not fall on a few
    columns of every row.
    """
    flat = data.reshape(-1)
    stride = max(1, flat.size // _SAMPLE)
    while stride > 1 and math.gcd(stride, data.shape[-1]) != 1:
        stride += 1
    return flat[::stride], stride


def _otsu(values: np.ndarray, lo: float, hi: float) -> float:
    """Otsu's threshold (maximal between-class variance) of ``values`` on [lo, top]."""
    top = float(np.percentile(values, 99.9))
    if top <= lo:
        top = hi
    hist, edges = np.histogram(values, bins=256, range=(lo, top))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where((w0 > 1e-12) & (w1 > 1e-12),
                           (m0[-1] * w0 - m0) ** 2 / (w0 * w1), 0.0)
    return float(edges[int(np.argmax(between)) + 1])


def foreground_threshold(values: np.ndarray, lo: float, hi: float) -> tuple[float, str]:
    """Threshold between background and brain/head (voxels ``> threshold`` are foreground).

    Args:
        values: a sample of the volume's voxels (1-D float).
        lo, hi: the minimum and maximum of the volume, or of the sample (a stripped
            background holds >= 5 % of the voxels, so the sample holds it too).

    Returns:
        ``(threshold, rule)``: rule "background" (skull-stripped: the threshold is ``lo``)
        or "otsu".
    """
    at_bg = values == lo
    n_bg = int(np.count_nonzero(at_bg))
    if _BG_FRACTION * values.size <= n_bg < values.size:
        rest = values[~at_bg]
        p99 = float(np.percentile(rest, 99))
        dim = int(np.count_nonzero(rest < lo + _STEP * (p99 - lo)))
        if dim < _DIM_FRACTION * rest.size:
            return lo, "background"
    return _otsu(values, lo, hi), "otsu"


def block_shape(voxel_mm, shape) -> tuple[int, int, int]:
    """Blocks of about 4 mm (1 to 4 voxels) per axis; 1x1x1 when a side is under 16 voxels.

    Args:
        voxel_mm: voxel size along each axis (mm).
        shape: the volume's grid.
    """
    if min(shape) < 16:
        return (1, 1, 1)
    return tuple(min(4, max(1, math.floor(_BLOCK_MM / v + 0.5)))  # type: ignore[return-value]
                 for v in voxel_mm)


def _block_sum(u: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    """Sums of ``block``-sized blocks of a uint8 array whose sides are multiples of them."""
    s = u
    for axis, k in enumerate(block):
        if k == 1:
            continue
        parts = [s[(slice(None),) * axis + (slice(j, None, k),)] for j in range(k)]
        acc = parts[0] + parts[1]
        for part in parts[2:]:
            acc += part
        s = acc
    return s


def _clear_blocks(fine: np.ndarray, blocks: np.ndarray, block: tuple[int, ...]) -> None:
    """Set every voxel of the given blocks (flat block indices) of C-contiguous ``fine`` False."""
    (p0, p1, p2), (k0, k1, k2) = fine.shape, block
    b0, b1, b2 = np.unravel_index(blocks, (p0 // k0, p1 // k1, p2 // k2))
    base = ((b0 * k0) * p1 + b1 * k1) * p2 + b2 * k2
    d0, d1, d2 = np.ogrid[:k0, :k1, :k2]
    offs = ((d0 * p1 + d1) * p2 + d2).ravel()
    fine.reshape(-1)[(base[:, None] + offs).ravel()] = False


def _main_blocks(data: np.ndarray, threshold: float, block: tuple[int, ...]) -> np.ndarray:
    """Voxels above ``threshold`` in the main 6-connected component of ``block``-sized blocks."""
    shape = data.shape
    padded = tuple(-(-n // k) * k for n, k in zip(shape, block))
    fine = np.empty(padded, dtype=bool)
    inner = fine[: shape[0], : shape[1], : shape[2]]
    np.greater(data, threshold, out=inner)
    fine[shape[0]:] = False
    fine[:, shape[1]:] = False
    fine[:, :, shape[2]:] = False
    counts = _block_sum(fine.view(np.uint8), block)
    occupied = counts > 0
    box = []  # label only the occupied blocks' bounding box (same components, fewer voxels)
    for axis in range(3):
        hit = np.flatnonzero(occupied.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            raise QuarantineError("empty", "no voxel above the brain threshold")
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(box)
    lab, n = ndimage.label(occupied[box])
    if n > 1:  # keep the component with the most foreground voxels
        sizes = np.bincount(lab.reshape(-1), weights=counts[box].reshape(-1), minlength=n + 1)
        sizes[0] = 0
        others = np.zeros(occupied.shape, dtype=bool)
        others[box] = (lab != 0) & (lab != int(np.argmax(sizes)))
        _clear_blocks(fine, np.flatnonzero(others), block)
    return inner if inner.shape == padded else np.ascontiguousarray(inner)


def _largest_filled(data: np.ndarray, threshold: float) -> np.ndarray:
    """Largest 6-connected component of ``data > threshold``, enclosed voxels filled."""
    lab, n = ndimage.label(data > threshold)
    if n == 0:
        raise QuarantineError("empty", "no voxel above the brain threshold")
    sizes = np.bincount(lab.reshape(-1))
    sizes[0] = 0
    mask = lab == int(np.argmax(sizes))
    lab, n = ndimage.label(~mask)
    border = np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(),
                             lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    outside = np.zeros(n + 1, dtype=bool)
    outside[border] = True
    outside[0] = False  # label 0 is the component itself
    return ~outside[lab]


def mask_above(data: np.ndarray, threshold: float, rule: str = "otsu",
               block: tuple[int, int, int] = (2, 2, 2)) -> np.ndarray:
    """The brain mask of ``data`` for a threshold from :func:`foreground_threshold`.

    Args:
        data: float array (x, y, z).
        threshold: foreground is ``data > threshold``.
        rule: "background" (skull-stripped: main component at the block level, nothing
            filled) or "otsu" (largest component with its holes filled, voxel level).
        block: the blocks of the "background" rule (:func:`block_shape`).

    Returns:
        Boolean C-contiguous array of ``data.shape``.

    Raises:
        QuarantineError: `empty` when fewer than 27 voxels are in the mask.
    """
    if rule == "background":
        mask = _main_blocks(data, threshold, block if min(data.shape) >= 16 else (1, 1, 1))
    else:
        mask = _largest_filled(data, threshold)
    n_mask = int(np.count_nonzero(mask))
    if n_mask < MIN_MASK_VOXELS:
        raise QuarantineError("empty", f"no brain found (mask of {n_mask} voxels)")
    return mask


def brain_mask(data: np.ndarray, voxel_mm=(2.0, 2.0, 2.0)) -> np.ndarray:
    """Boolean brain (or head) mask: threshold, main component (see the module docstring).

    Args:
        data: float array (x, y, z).
        voxel_mm: voxel size (mm) per axis (sets the blocks of a skull-stripped image).

    Returns:
        Boolean array of the same shape.

    Raises:
        QuarantineError: `empty` when fewer than 27 voxels survive.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    values, _ = sample(arr)
    threshold, rule = foreground_threshold(values, float(arr.min()), float(arr.max()))
    return mask_above(arr, threshold, rule, block_shape(voxel_mm, arr.shape))
