"""The MNI ICBM152 2009 template maps that nilearn ships, on the simulator's working grid.

nilearn carries the 1 mm T1, grey-matter (GM) and white-matter (WM) maps of the ICBM152 2009
nonlinear symmetric template (197 x 233 x 189 voxels, RAS, world = MNI mm). From them this
module derives, once per process and per working spacing (``functools.lru_cache``, nothing is
written to disk):

- a brain mask ``mask`` (the template T1 is brain-extracted: every voxel with T1 > 0);
- partial-volume maps ``gm``, ``wm`` and ``csf = mask - gm - wm`` (each in [0, 1]);
- the lateral ventricles: the two large CSF-like components (low T1, little GM/WM) near the
  centre of the brain, as a signed distance map ``ventricle_distance`` (mm, negative inside),
  so that ventricle enlargement can be simulated as a smooth outward growth of the wall;
- ``gm_loss_weight``: a smooth weight (mean 1 over GM) that makes frontal GM atrophy faster
  than occipital GM, as reported in ageing studies.

The template is treated as a ~25-year-old brain (``TEMPLATE_AGE``).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from rankcore._validate import check_positive
from rankcore.errors import InputError

#: Age (years) the ICBM152 2009 template brain is taken to represent.
TEMPLATE_AGE = 25.0

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Margin (mm) of the working grid around the template brain's bounding box.
_GRID_MARGIN_MM = 4.0
#: Margin (mm) around the ventricles inside which their signed distance is computed; growth
#: beyond it is impossible (the simulator caps the outward growth below this).
VENTRICLE_ROI_MARGIN_MM = 28.0
#: Search box (MNI mm) for the lateral ventricles: components must lie strictly inside it.
_VENTRICLE_BOX = ((-45.0, 45.0), (-70.0, 50.0), (-30.0, 50.0))
_MIN_VENTRICLE_ML = 1.0


@dataclass(frozen=True, eq=False)
class TemplateMaps:
    """Template maps on one working grid (RAS, world = MNI mm); arrays are read-only float32.

    Attributes:
        spacing: voxel size of the working grid (mm, isotropic).
        affine: 4x4 voxel-to-world affine of the working grid.
        mask, gm, wm, csf: partial-volume maps, shape ``shape``; ``gm + wm + csf == mask``.
        ventricle_distance: signed distance to the lateral ventricles' wall (mm, < 0 inside),
            only meaningful inside ``ventricle_roi``; shape of that ROI.
        ventricle_roi: slices of the working grid that hold ``ventricle_distance``.
        ventricle_room: most ventricle partial volume each ROI voxel can hold: the brain mask,
            minus a septum (the 2-voxel-wide midline) so that the left and right ventricles
            stay apart however much they grow.
        gm_loss_weight: spatial weight of GM loss, mean 1 over GM (``sum(gm*w) == sum(gm)``).
        brain_centre: centre (world mm) of the brain mask; head scale and rotation act about it.
        brain_corners: (8, 3) corners (world mm) of the brain's bounding box.
    """

    spacing: float
    affine: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricle_distance: np.ndarray
    ventricle_roi: tuple[slice, slice, slice]
    ventricle_room: np.ndarray
    gm_loss_weight: np.ndarray
    brain_centre: np.ndarray
    brain_corners: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        """Volume of one working voxel in millilitres."""
        return self.spacing**3 / 1000.0


def _data_dir() -> Path:
    """Folder of nilearn's bundled template files, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the cohort simulator needs nilearn (it ships the MNI ICBM152 2009 "
                         "maps), got no importable `nilearn` package")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [f for f in _FILES.values() if not (folder / f).is_file()]
    if missing:
        raise InputError(f"nilearn's MNI ICBM152 2009 maps must be in {folder}, got none of "
                         f"{missing}")
    return folder


@functools.lru_cache(maxsize=1)
def _native() -> dict[str, np.ndarray]:
    """1 mm maps scaled to [0, 1] (as nilearn's load_mni152_*_template do) and derived masks.

    Cropped to the brain's bounding box plus a margin (half the template is background);
    ``affine`` is the crop's voxel-to-MNI affine, ``bbox`` the brain's (lo, hi) voxel indices.
    """
    folder = _data_dir()
    imgs = {k: nib.load(folder / f) for k, f in _FILES.items()}
    affine = imgs["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise InputError(f"the MNI template must be a 1 mm RAS grid, got affine {affine.tolist()}")
    raw = {k: np.asarray(img.dataobj) for k, img in imgs.items()}
    lo, hi = _bbox(raw["t1"] > 0)
    pad = int(_GRID_MARGIN_MM) + 3
    lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad + 1, raw["t1"].shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    arrs = {k: r[crop].astype(np.float32) * np.float32(1.0 / r.max()) for k, r in raw.items()}
    brain = arrs["t1"] > 0
    gm = np.where(brain, arrs["gm"], np.float32(0.0))
    wm = np.where(brain, arrs["wm"], np.float32(0.0))
    tissue = gm + wm
    over = tissue > 1.0
    gm[over] /= tissue[over]
    wm[over] /= tissue[over]
    ventricles = _lateral_ventricles(arrs["t1"], gm, wm, brain, affine)
    return {"affine": affine, "mask": brain.astype(np.float32), "gm": gm, "wm": wm,
            "ventricles": ventricles, "bbox": _bbox(brain)}


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index (inclusive) of the True voxels along each axis."""
    lo, hi = [], []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo), np.array(hi)


def _world_grid(shape: tuple[int, ...], affine: np.ndarray) -> list[np.ndarray]:
    """World coordinates (mm) of each axis of an axis-aligned RAS grid, broadcastable."""
    out = []
    for ax in range(3):
        idx = np.arange(shape[ax], dtype=np.float64)
        coord = affine[ax, ax] * idx + affine[ax, 3]
        out.append(coord.reshape([-1 if a == ax else 1 for a in range(3)]))
    return out


def _lateral_ventricles(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray,
                        affine: np.ndarray) -> np.ndarray:
    """Binary 1 mm mask of the lateral ventricles.

    CSF-like voxels (inside the brain, GM + WM < 0.35, T1 darker than 0.4 of the maximum) that
    form components of at least 1 ml lying strictly inside a central box: in the template
    these are exactly the left and right lateral ventricles (~7 ml each); the midline CSF of
    the interhemispheric fissure and cisterns touches the box and is left out.
    """
    inv = np.linalg.inv(affine)
    lo = np.floor(inv[:3, :3] @ [b[0] for b in _VENTRICLE_BOX] + inv[:3, 3]).astype(int)
    hi = np.ceil(inv[:3, :3] @ [b[1] for b in _VENTRICLE_BOX] + inv[:3, 3]).astype(int)
    lo, hi = np.maximum(np.minimum(lo, hi), 0), np.minimum(np.maximum(lo, hi) + 1, t1.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    csf_like = brain[box] & (gm[box] + wm[box] < 0.35) & (t1[box] < 0.4)
    labels, _ = ndi.label(csf_like)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        # Strictly inside the box: the component's bounding box does not touch its faces.
        touches = any(s.start == 0 or s.stop == n for s, n in zip(sl, labels.shape))
        keep[lab] = not touches and (labels[sl] == lab).sum() >= _MIN_VENTRICLE_ML * 1000
    ventricles = np.zeros(t1.shape, dtype=bool)
    ventricles[box] = ndi.binary_closing(keep[labels], iterations=1)
    if ventricles.sum() < 2 * _MIN_VENTRICLE_ML * 1000:
        raise InputError("the MNI template's lateral ventricles must be found, got "
                         f"{int(ventricles.sum())} voxels (unexpected template file)")
    return ventricles


def _resample(src: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              shape: tuple[int, ...], *, cval: float = 0.0) -> np.ndarray:
    """Trilinear resampling of ``src`` onto the grid (``dst_affine``, ``shape``)."""
    matrix = np.linalg.solve(src_affine, dst_affine)
    return ndi.affine_transform(src, matrix, output_shape=shape, order=1, cval=cval,
                                mode="constant", prefilter=False).astype(np.float32)


def _downsample(pv: np.ndarray, spacing: float, src_affine: np.ndarray,
                dst_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Partial-volume map on a coarser grid: Gaussian of FWHM ``spacing`` then trilinear."""
    sigma = np.sqrt(max(spacing**2 - 1.0, 0.0)) / 2.3548
    smooth = ndi.gaussian_filter(pv, sigma, truncate=2.5) if sigma > 0.1 else pv
    return np.clip(_resample(smooth, src_affine, dst_affine, shape), 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def template_maps(spacing: float = 2.0) -> TemplateMaps:
    """Return the template maps on an isotropic working grid of ``spacing`` mm (cached).

    Args:
        spacing: working voxel size in mm (0.5 to 8).

    Returns:
        TemplateMaps whose arrays have shape ~ (157, 193, 167) / spacing.
    """
    spacing = check_positive(spacing, "spacing")
    if not 0.5 <= spacing <= 8.0:
        raise InputError(f"`spacing` must be between 0.5 and 8 mm, got {spacing!r}")
    nat = _native()
    a1, (b_lo, b_hi) = nat["affine"], nat["bbox"]

    world_lo = a1[:3, :3] @ b_lo + a1[:3, 3]
    world_hi = a1[:3, :3] @ b_hi + a1[:3, 3]
    origin = world_lo - _GRID_MARGIN_MM
    shape = tuple(int(np.ceil((h - o + _GRID_MARGIN_MM) / spacing)) + 1
                  for o, h in zip(origin, world_hi))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin

    mask = _downsample(nat["mask"], spacing, a1, affine, shape)
    gm = _downsample(nat["gm"], spacing, a1, affine, shape)
    wm = _downsample(nat["wm"], spacing, a1, affine, shape)
    gm = np.minimum(gm, mask)
    wm = np.minimum(wm, mask - gm)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    dist, roi = _ventricle_distance(nat["ventricles"], a1, affine, shape)
    x_roi = _world_grid(shape, affine)[0][roi[0]]
    room = (mask[roi] * np.clip(np.abs(x_roi) / spacing, 0.0, 1.0)).astype(np.float32)

    # Frontal GM atrophies faster than occipital GM: weight 1.3 at the front, 0.7 at the back.
    _, y, _ = _world_grid(shape, affine)
    y_span = max(world_hi[1] - world_lo[1], 1.0)
    weight = np.broadcast_to(
        1.0 + 0.6 * ((y - world_lo[1]) / y_span - 0.5), shape).astype(np.float32)
    weight = (weight * (gm.sum() / max(float((gm * weight).sum()), 1e-6))).astype(np.float32)

    centre = np.array(ndi.center_of_mass(nat["mask"]))
    centre_world = a1[:3, :3] @ centre + a1[:3, 3]
    corners = np.array([[x, y, z] for x in (world_lo[0], world_hi[0])
                        for y in (world_lo[1], world_hi[1])
                        for z in (world_lo[2], world_hi[2])])
    for a in (mask, gm, wm, csf, dist, room, weight):
        a.setflags(write=False)
    return TemplateMaps(spacing=spacing, affine=affine, mask=mask, gm=gm, wm=wm, csf=csf,
                        ventricle_distance=dist, ventricle_roi=roi, ventricle_room=room,
                        gm_loss_weight=weight, brain_centre=centre_world, brain_corners=corners)


def _ventricle_distance(ventricles: np.ndarray, a1: np.ndarray, affine: np.ndarray,
                        shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Signed distance (mm, < 0 inside) to the ventricles' wall on an ROI of the working grid."""
    v_lo, v_hi = _bbox(ventricles)
    m = int(VENTRICLE_ROI_MARGIN_MM)
    lo = np.maximum(v_lo - m, 0)
    hi = np.minimum(v_hi + m + 1, ventricles.shape)
    sub = ventricles[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    # Distances between voxel centres, shifted by half a voxel so that the wall sits at 0;
    # the inside distance only needs the ventricles' own bounding box (+1 voxel).
    signed = ndi.distance_transform_edt(~sub).astype(np.float32) - 0.5
    inner = tuple(slice(int(a - b - 1), int(c - b + 2)) for a, b, c in zip(v_lo, lo, v_hi))
    inside = sub[inner]
    signed[inner][inside] = 0.5 - ndi.distance_transform_edt(inside)[inside]
    a_sub = a1.copy()
    a_sub[:3, 3] = a1[:3, :3] @ lo + a1[:3, 3]
    # ROI of the working grid covering the 1 mm ROI.
    w_lo = np.linalg.solve(affine, np.append(a_sub[:3, 3], 1.0))[:3]
    w_hi = np.linalg.solve(affine, np.append(a_sub[:3, :3] @ (hi - lo - 1) + a_sub[:3, 3],
                                             1.0))[:3]
    roi = tuple(slice(max(int(np.ceil(a)), 0), min(int(np.floor(b)) + 1, s))
                for a, b, s in zip(w_lo, w_hi, shape))
    a_roi = affine.copy()
    a_roi[:3, 3] = affine[:3, :3] @ np.array([s.start for s in roi]) + affine[:3, 3]
    roi_shape = tuple(s.stop - s.start for s in roi)
    dist = _resample(signed, a_sub, a_roi, roi_shape, cval=float(VENTRICLE_ROI_MARGIN_MM))
    return dist, roi
