"""One simulated subject ("phantom"): sample its random parameters, then render its image.

Sampling and rendering are separate (sample, then apply deterministically): ``sample_subject``
draws every random quantity of subject ``index`` into a frozen ``SubjectParams``;
``render_subject`` turns it into a NIfTI image with no further randomness.

Subject i draws from ``SeedSequence(seed, spawn_key=(i,))``; its site and file quirks come
from balanced plans (each block of k subjects holds each of k options once, in an order
seeded by ``(seed, block)``). So subject i never depends on how many subjects are simulated,
and small cohorts still contain every quirk.

Nuisances (FIELD.md, "Simulating a cohort"): head size (SD 3 %, men 4 % larger than women),
head pose (rotation SD 2 deg per axis, translation SD 2 mm), bias field, Rician noise at the
site's SNR (20-40), site gain/offset/contrast/blur; ventricle multiplier log-normal (CV 45 %,
clipped to [0.3, 3]) times 1.25 for men. With ``quirks``, a quarter of the ages are whole
years (age at last birthday); ages >= 89 are written "89+" (BIDS).

Anatomy (``anatomy``, on by default): each subject's aged tissue maps are deformed by its own
smooth, volume-preserving random warp (``rankcore.mri.anatomy``, RMS ``warp_sd_mm`` per axis,
nodes every 30 mm), the variability an affine registration cannot remove. The warp is drawn
from the subject's own seed, independently of its age; with ``anatomy`` off the images are
exactly those of a simulator without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from rankcore.errors import InputError
from rankcore.mri.ageing import AgedTissue, age_tissue
from rankcore.mri.anatomy import check_warp_sd, sample_warp, warp_maps
from rankcore.mri.mni import TemplateMaps, template_maps
from rankcore.mri.scanner import (
    acquire,
    axis_angle_matrix,
    head_pose,
    output_grid,
    site_profile,
    t1_contrast,
    to_nifti,
)

_PLAN_KEY = 0x9_1A_4E  # spawn-key prefix of the balanced plans (subjects use (i,))
# Balanced plans: every block of len(options) subjects holds each option once (shuffled).
_SITE_STREAM, _ORIENTATION_STREAM, _GRID_STREAM, _DTYPE_STREAM, _EXT_STREAM, _AGE_STREAM = range(6)
_ORIENTATION_PLAN = ("RAS", "RAS", "RAS", "LAS", "LAS", "LPS", "PIR", "ASL")
_GRID_PLAN = ("iso", "iso", "iso", "iso", "iso", "fine", "aniso", "oblique")
_DTYPE_PLAN = ("float32", "int16", "int16", "int16", "int16", "int16_scaled",
               "int16_scaled", "uint8_scaled")
_EXTENSION_PLAN = (".nii.gz",) * 7 + (".nii",)  # uncompressed files are 4x larger
_AGE_PLAN = ("decimal", "decimal", "decimal", "whole")
_VENTRICLE_CV = 0.45
_MALE_VENTRICLE_FACTOR = 1.25
_HEAD_SCALE_SD = 0.03
_MALE_HEAD_SCALE = 1.02  # and 0.98 for women: 4 % apart
_ROTATION_SD_DEG = 2.0
_TRANSLATION_SD_MM = 2.0
_CENSOR_AGE = 89.0  # BIDS writes ages >= 89 as "89+"
# Zero voxels kept around a warped brain (>= the site blur's reach at 1 mm spacing).
_CROP_MARGIN = 4


@dataclass(frozen=True)
class SimulationConfig:
    """What defines a simulated cohort (the output depends on these and nothing else).

    Attributes:
        subjects: number of valid subjects.
        seed: random seed (non-negative integer).
        spacing: working voxel size in mm (1-4); files are written at this size or finer.
        age_range: (low, high) chronological ages in years, drawn uniformly.
        sites: number of sites (scanners), subjects spread evenly over them.
        sigma_delta: SD (years) of brain age around chronological age.
        quirks: vary orientation, grid, dtype, extension and age precision between files.
        corrupt: number of extra, deliberately broken files (quarantine demo).
        anatomy: deform each subject's anatomy by its own smooth random warp.
        warp_sd_mm: RMS displacement per axis of that warp over the brain (mm, 0-4); only
            used with ``anatomy``.
    """

    subjects: int = 200
    seed: int = 0
    spacing: float = 2.0
    age_range: tuple[float, float] = (20.0, 85.0)
    sites: int = 3
    sigma_delta: float = 2.5
    quirks: bool = True
    corrupt: int = 0
    anatomy: bool = True
    warp_sd_mm: float = 2.5

    def __post_init__(self) -> None:
        for name, low in (("subjects", 1), ("seed", 0), ("sites", 1), ("corrupt", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
                raise InputError(f"`{name}` must be an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))
        if (isinstance(self.spacing, bool) or not isinstance(self.spacing, int | float)
                or not 1.0 <= self.spacing <= 4.0):
            raise InputError(f"`spacing` must be a number of mm between 1 and 4, "
                             f"got {self.spacing!r}")
        try:
            lo, hi = (float(a) for a in self.age_range)
        except (TypeError, ValueError):
            raise InputError(f"`age_range` must be two ages (low, high) in years, "
                             f"got {self.age_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 100):
            raise InputError(f"`age_range` must be (low, high) with 0 <= low < high <= 100 years, "
                             f"got {self.age_range!r}")
        if not (isinstance(self.sigma_delta, int | float) and math.isfinite(self.sigma_delta)
                and 0 <= self.sigma_delta <= 20):
            raise InputError(f"`sigma_delta` must be a number of years in [0, 20], "
                             f"got {self.sigma_delta!r}")
        for name in ("quirks", "anatomy"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "warp_sd_mm", check_warp_sd(self.warp_sd_mm))
        object.__setattr__(self, "spacing", float(self.spacing))
        object.__setattr__(self, "age_range", (lo, hi))
        object.__setattr__(self, "sigma_delta", float(self.sigma_delta))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["age_range"] = list(self.age_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulationConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "age_range" in kw:
            kw["age_range"] = tuple(kw["age_range"])
        return cls(**kw)


@dataclass(frozen=True)
class SubjectParams:
    """Every random quantity of one simulated subject (sampled by ``sample_subject``)."""

    index: int
    participant_id: str
    age: float                 # chronological age (years, exact)
    age_reported: float        # as written in participants.tsv
    age_text: str              # "47.3", "47" or "89+"
    sex: str                   # "F" or "M"
    site_index: int
    site: str
    delta: float               # brain age - age (years)
    brain_age: float
    head_scale: float
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    ventricle_multiplier: float
    snr: float
    bias_coeffs: tuple[float, ...]
    grid_axis: tuple[float, float, float]
    grid_angle_deg: float
    noise_seed: int
    orientation: str
    grid: str
    dtype: str
    extension: str
    warp_sd_mm: float = 0.0    # RMS displacement of the anatomy warp (mm); 0 = template anatomy
    warp_seed: int = 0

    @property
    def relpath(self) -> Path:
        """Path of the T1 file relative to the cohort root."""
        pid = self.participant_id
        return Path(pid) / "anat" / f"{pid}_T1w{self.extension}"


def _balanced(seed: int, stream: int, index: int, options: tuple) -> Any:
    """Option of subject ``index``: a seeded shuffle of ``options`` per block of len(options)."""
    block, pos = divmod(index, len(options))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_KEY, stream,
                                                                         block)))
    return options[int(rng.permutation(len(options))[pos])]


def participant_id(index: int) -> str:
    """BIDS label of subject ``index`` (0-based): sub-0001, sub-0002, ..."""
    return f"sub-{index + 1:04d}"


def sample_subject(config: SimulationConfig, index: int) -> SubjectParams:
    """Draw subject ``index``'s parameters; independent of ``config.subjects``."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise InputError(f"`index` must be a non-negative integer, got {index!r}")
    index = int(index)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(index,)))
    # The order of the draws below is part of the output format: only append new draws.
    age = float(rng.uniform(*config.age_range))
    male = bool(rng.random() < 0.5)
    delta = float(rng.normal(0.0, config.sigma_delta))
    head_scale = float((_MALE_HEAD_SCALE if male else 2 - _MALE_HEAD_SCALE)
                       * np.exp(rng.normal(0.0, _HEAD_SCALE_SD)))
    s_ln = math.sqrt(math.log1p(_VENTRICLE_CV**2))
    multiplier = float(np.exp(rng.normal(-0.5 * s_ln**2, s_ln)))
    multiplier = float(np.clip(multiplier, 0.3, 3.0)) * (_MALE_VENTRICLE_FACTOR if male else 1.0)
    rotation = tuple(float(a) for a in rng.normal(0.0, _ROTATION_SD_DEG, 3))
    translation = tuple(float(a) for a in rng.normal(0.0, _TRANSLATION_SD_MM, 3))
    snr_u = float(rng.random())
    bias = tuple(float(c) for c in rng.normal(0.0, 1.0, 9))
    axis = rng.normal(size=3)
    axis = tuple(float(a) for a in axis / np.linalg.norm(axis))
    angle = float(rng.uniform(8.0, 20.0))
    noise_seed = int(rng.integers(2**63))
    warp_seed = int(rng.integers(2**63))  # drawn even without anatomy: later draws stay put

    seed, q = config.seed, config.quirks
    site_index = int(_balanced(seed, _SITE_STREAM, index, tuple(range(config.sites))))
    site = site_profile(site_index)
    whole = q and _balanced(seed, _AGE_STREAM, index, _AGE_PLAN) == "whole"
    if age >= _CENSOR_AGE:
        reported, text = _CENSOR_AGE, "89+"
    elif whole:
        reported = float(math.floor(age))
        text = str(int(reported))
    else:
        reported = round(age, 1)
        text = f"{reported:.1f}"
    lo, hi = site.snr_range
    return SubjectParams(
        index=index, participant_id=participant_id(index), age=age, age_reported=reported,
        age_text=text, sex="M" if male else "F", site_index=site_index, site=site.name,
        delta=delta, brain_age=float(np.clip(age + delta, 0.0, 120.0)), head_scale=head_scale,
        rotation_deg=rotation, translation_mm=translation, ventricle_multiplier=multiplier,
        snr=lo + snr_u * (hi - lo), bias_coeffs=bias, grid_axis=axis, grid_angle_deg=angle,
        noise_seed=noise_seed,
        orientation=_balanced(seed, _ORIENTATION_STREAM, index, _ORIENTATION_PLAN) if q else "RAS",
        grid=_balanced(seed, _GRID_STREAM, index, _GRID_PLAN) if q else "iso",
        dtype=_balanced(seed, _DTYPE_STREAM, index, _DTYPE_PLAN) if q else "float32",
        extension=_balanced(seed, _EXT_STREAM, index, _EXTENSION_PLAN) if q else ".nii.gz",
        warp_sd_mm=config.warp_sd_mm if config.anatomy else 0.0, warp_seed=warp_seed,
    )


def render_subject(params: SubjectParams, spacing: float = 2.0,
                   ) -> tuple[nib.Nifti1Image, AgedTissue, tuple[float, float, float]]:
    """Make the NIfTI image of ``params`` (deterministic); return (image, AgedTissue, voxel mm).

    The returned AgedTissue holds the maps that were rendered (warped when
    ``params.warp_sd_mm > 0``, on the warp's padded grid) and their volumes in template space;
    multiply by ``params.head_scale ** 3`` for the subject's own volumes.
    """
    tpl = template_maps(spacing)
    site = site_profile(params.site_index)
    tissue, mask, affine, corners = subject_anatomy(tpl, params)
    t1 = t1_contrast(tissue.gm, tissue.wm, tissue.csf, site, tpl.spacing)
    pose = head_pose(tpl.brain_centre, params.head_scale, np.array(params.rotation_deg),
                     np.array(params.translation_mm))
    corners = corners @ pose[:3, :3].T + pose[:3, 3]
    s = tpl.spacing
    voxel = {"iso": (s, s, s), "oblique": (s, s, s), "fine": (0.75 * s,) * 3,
             "aniso": (0.6 * s, 0.6 * s, s)}[params.grid]
    rot = (axis_angle_matrix(np.array(params.grid_axis), params.grid_angle_deg)
           if params.grid == "oblique" else None)
    out_affine, out_shape = output_grid(corners, voxel, rot)
    image = acquire(t1, mask, affine, pose, out_affine, out_shape,
                    centre=tpl.brain_centre, site=site, snr=params.snr,
                    bias_coeffs=np.array(params.bias_coeffs), noise_seed=params.noise_seed)
    img = to_nifti(image, out_affine, orientation=params.orientation, dtype=params.dtype)
    return img, tissue, voxel


def subject_anatomy(template: TemplateMaps, params: SubjectParams,
                    ) -> tuple[AgedTissue, np.ndarray, np.ndarray, np.ndarray]:
    """The subject's aged, warped tissue: (AgedTissue, brain mask, grid affine, box corners).

    Without a warp (``params.warp_sd_mm == 0``) these are the aged template maps on the
    template grid, ``template.mask``, ``template.affine`` and ``template.brain_corners``.
    With one, the maps, mask and volumes are those of the warped brain, on the warp's padded
    grid cropped to the warped brain plus a margin of ``_CROP_MARGIN`` voxels, and the
    corners are those of the warped brain's bounding box.
    """
    tissue = age_tissue(template, params.brain_age, params.ventricle_multiplier)
    if params.warp_sd_mm == 0.0:
        return tissue, template.mask, template.affine, template.brain_corners
    warp = sample_warp(template, params.warp_seed, params.warp_sd_mm)
    maps = warp_maps(warp, template.mask, tissue.gm, tissue.wm, tissue.ventricles)
    # Crop to the warped brain: a smaller grid to blur, and a tight field of view.
    nonzero = np.argwhere(maps[0] > 0)
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0)
    crop = tuple(slice(max(int(a) - _CROP_MARGIN, 0), int(b) + _CROP_MARGIN + 1)
                 for a, b in zip(lo, hi))
    mask, gm, wm, ventricles = (np.ascontiguousarray(m[crop]) for m in maps)
    affine = warp.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([c.start for c in crop])
    box = warp.affine[:3, :3] @ np.stack([lo, hi]).T + warp.affine[:3, 3:4]  # (3, 2) world mm
    corners = np.array([[x, y, z] for x in box[0] for y in box[1] for z in box[2]])
    csf = np.maximum(mask - gm - wm, np.float32(0.0))
    ml = template.voxel_ml
    warped = replace(tissue, gm=gm, wm=wm, csf=csf, ventricles=ventricles,
                     gm_ml=float(gm.sum()) * ml, wm_ml=float(wm.sum()) * ml,
                     csf_ml=float(csf.sum()) * ml, ventricle_ml=float(ventricles.sum()) * ml,
                     warp_sd_mm=warp.sd_mm, warp_max_mm=warp.max_mm)
    return warped, mask, affine, corners
