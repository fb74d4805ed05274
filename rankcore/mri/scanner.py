"""The acquisition side of the cohort simulator: sites, head pose, bias, noise and file quirks.

Everything here is deterministic: random draws happen in ``rankcore.mri.simulate`` (sample,
then apply). A simulated image is made in four steps:

1. ``t1_contrast``: partial volumes -> T1 intensities (WM = 1, site-specific GM and CSF
   contrast), blurred by the site's point-spread function;
2. ``acquire``: resampled (trilinear) from template space onto the subject's output grid
   through the head pose (head scale, rotation, translation about the brain centre), then a
   smooth multiplicative bias field, the site gain, Rician noise and the site offset; voxels
   outside the (moved) brain mask are 0, as after skull stripping;
3. ``to_nifti``: stored with a chosen dtype (float32, int16, int16 or uint8 with
   scl_slope/scl_inter) and axis orientation (the affine always maps to the same world);
4. ``encode``: NIfTI bytes, gzip-compressed (level 1, mtime 0, so bytes are reproducible)
   for ``.nii.gz``. ``corrupt`` makes the broken files of the quarantine demo.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage as ndi

from rankcore._validate import check_choice
from rankcore.errors import InputError

#: Stored axis orientations (nibabel axis codes); "PIR" and "ASL" permute the axes.
ORIENTATIONS = ("RAS", "LAS", "LPS", "PIR", "ASL")
#: Output grid kinds: working spacing s; "fine" 0.75 s; "aniso" 0.6 s x 0.6 s x s; "oblique"
#: s, with the grid rotated (the affine is then not a permutation of a diagonal).
GRID_KINDS = ("iso", "fine", "aniso", "oblique")
#: Stored dtypes; the "_scaled" ones carry scl_slope/scl_inter chosen by nibabel.
DTYPES = ("float32", "int16", "int16_scaled", "uint8_scaled")
EXTENSIONS = (".nii.gz", ".nii")
#: Broken files and the quarantine category (rankcore.mri.types) each should get.
CORRUPTIONS = {
    "truncated_gzip": "unreadable",
    "nan_voxels": "nonfinite",
    "singular_affine": "bad_affine",
    "constant": "empty",
    "two_volumes": "wrong_dims",
}
_SITE_ENTROPY = 0x51_7E_5C_A9  # site profiles depend on the site index only, not the seed
_FOV_MARGIN_MM = 6.0
_BIAS_SCALE_MM = 80.0


@dataclass(frozen=True)
class SiteProfile:
    """One scanner: intensity scale and contrast, resolution and noise level.

    Attributes:
        name: the ``site`` label written to participants.tsv.
        gain: WM intensity in scanner units.
        offset: added to every brain voxel, as a fraction of ``gain``.
        gm_contrast, csf_contrast: GM and CSF intensity relative to WM.
        blur_fwhm_mm: extra Gaussian point-spread (FWHM, mm).
        snr_range: (low, high) WM signal-to-noise ratio of this site's scans.
        bias_strength: SD of the log bias-field coefficients.
    """

    name: str
    gain: float
    offset: float
    gm_contrast: float
    csf_contrast: float
    blur_fwhm_mm: float
    snr_range: tuple[float, float]
    bias_strength: float


def site_profile(index: int) -> SiteProfile:
    """The scanner of site ``index`` (0-based); the same in every simulated cohort.

    Depending on the index only (not on the cohort's seed) means that cohorts simulated with
    different seeds share their scanners, like a new batch of subjects from the same sites.
    """
    if not isinstance(index, int | np.integer) or index < 0:
        raise InputError(f"`site` index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng(np.random.SeedSequence([_SITE_ENTROPY, int(index)]))
    snr_lo = rng.uniform(20.0, 30.0)
    return SiteProfile(
        name=f"site{int(index) + 1}",
        gain=float(np.exp(rng.uniform(np.log(300.0), np.log(1500.0)))),
        offset=float(rng.uniform(-0.03, 0.08)),
        gm_contrast=float(rng.uniform(0.65, 0.78)),
        csf_contrast=float(rng.uniform(0.10, 0.30)),
        blur_fwhm_mm=float(rng.uniform(0.0, 2.5)),
        snr_range=(float(snr_lo), float(min(snr_lo + rng.uniform(4.0, 10.0), 40.0))),
        bias_strength=float(rng.uniform(0.04, 0.12)),
    )


def t1_contrast(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, site: SiteProfile,
                spacing: float) -> np.ndarray:
    """T1 intensity (WM = 1) of partial-volume maps, blurred by the site's PSF (same shape)."""
    t1 = (wm + np.float32(site.gm_contrast) * gm + np.float32(site.csf_contrast) * csf)
    sigma = site.blur_fwhm_mm / 2.3548 / spacing
    if sigma > 0.05:
        t1 = ndi.gaussian_filter(t1, sigma, truncate=3.0)
    return t1.astype(np.float32, copy=False)


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """3x3 rotation Rz @ Ry @ Rx of angles (degrees) about the x, y and z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def axis_angle_matrix(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` about the unit vector ``axis`` (Rodrigues' formula)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def head_pose(centre: np.ndarray, scale: float, rotation_deg: np.ndarray,
              translation_mm: np.ndarray) -> np.ndarray:
    """4x4 map from template world (mm) to subject world: scale and rotate about ``centre``."""
    pose = np.eye(4)
    pose[:3, :3] = scale * rotation_matrix(rotation_deg)
    pose[:3, 3] = centre + np.asarray(translation_mm) - pose[:3, :3] @ centre
    return pose


def output_grid(corners: np.ndarray, voxel_mm: tuple[float, float, float],
                grid_rotation: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Smallest grid (affine, shape) of the given voxel size covering ``corners`` + a margin.

    Args:
        corners: (n, 3) world points (mm) the grid must contain.
        voxel_mm: voxel size along the grid's three axes.
        grid_rotation: 3x3 rotation of the grid axes (oblique acquisition), or None.
    """
    lo, hi = corners.min(axis=0) - _FOV_MARGIN_MM, corners.max(axis=0) + _FOV_MARGIN_MM
    box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                    for z in (lo[2], hi[2])])
    axes = np.diag(voxel_mm) if grid_rotation is None else grid_rotation @ np.diag(voxel_mm)
    u = np.linalg.solve(axes, box.T)
    u_lo, u_hi = np.floor(u.min(axis=1)), np.ceil(u.max(axis=1))
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = axes @ u_lo
    return affine, tuple(int(n) for n in (u_hi - u_lo + 1))


def _bias_field(affine: np.ndarray, shape: tuple[int, ...], centre: np.ndarray,
                coeffs: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(p(u)), p a quadratic polynomial of the world position.

    u = (world - centre) / 80 mm; p(u) = g.u + u'Qu - 0.3 tr(Q) with g = c[0:3] and Q built
    from c[3:9] (x², y², z², xy, xz, yz), c = ``coeffs * strength``. Being quadratic in u, p is
    quadratic in the voxel indices too, which is how it is evaluated (few full-size passes).
    """
    c = np.asarray(coeffs, dtype=np.float64) * strength
    q = np.array([[c[3], c[6] / 2, c[7] / 2], [c[6] / 2, c[4], c[8] / 2],
                  [c[7] / 2, c[8] / 2, c[5]]])
    m = affine[:3, :3] / _BIAS_SCALE_MM            # u = m @ index + t
    t = (affine[:3, 3] - centre) / _BIAS_SCALE_MM
    qv = m.T @ q @ m
    gv = m.T @ (2 * q @ t + c[:3])
    const = t @ q @ t + c[:3] @ t - 0.3 * np.trace(q)
    i, j, k = (np.arange(n, dtype=np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
               for ax, n in enumerate(shape))
    f = np.float32
    plane = (f(qv[0, 0]) * i * i + f(gv[0]) * i + f(const) + f(qv[1, 1]) * j * j + f(gv[1]) * j
             + f(2 * qv[0, 1]) * i * j)
    slope = f(2 * qv[0, 2]) * i + f(2 * qv[1, 2]) * j + f(gv[2])
    log_field = k * (slope + f(qv[2, 2]) * k)
    log_field += plane
    return np.exp(log_field, out=log_field)


def acquire(t1: np.ndarray, mask: np.ndarray, template_affine: np.ndarray, pose: np.ndarray,
            out_affine: np.ndarray, out_shape: tuple[int, ...], *, centre: np.ndarray,
            site: SiteProfile, snr: float, bias_coeffs: np.ndarray,
            noise_seed: int) -> np.ndarray:
    """Scan a template-space T1 image of a subject placed by ``pose`` onto the output grid.

    Args:
        t1: (X, Y, Z) intensities on the template working grid (WM = 1).
        mask: brain partial volume on the same grid.
        template_affine: voxel-to-world affine of that grid.
        pose: 4x4 template-world -> subject-world map (``head_pose``).
        out_affine, out_shape: the output grid.
        centre: brain centre (world mm) for the bias field.
        site: scanner profile; snr: WM signal / noise SD; bias_coeffs: 9 field coefficients.
        noise_seed: seed of the noise generator.

    Returns:
        float32 image of ``out_shape`` in scanner units; 0 outside the brain.
    """
    matrix = np.linalg.solve(template_affine, np.linalg.solve(pose, out_affine))
    warp = dict(matrix=matrix, output_shape=out_shape, order=1, mode="constant", cval=0.0,
                prefilter=False)
    image = ndi.affine_transform(t1, **warp).astype(np.float32, copy=False)
    # Skull-strip mask: nearest neighbour is enough for a binary mask (3x cheaper).
    brain = ndi.affine_transform(mask, **{**warp, "order": 0}) >= 0.5
    image *= _bias_field(out_affine, out_shape, centre, bias_coeffs, site.bias_strength)
    gain = np.float32(site.gain)
    image *= gain
    rng = np.random.default_rng(noise_seed)
    sigma = np.float32(site.gain / snr)
    n_brain = int(brain.sum())
    signal = image[brain]
    real = signal + sigma * rng.standard_normal(n_brain, dtype=np.float32)
    imag = sigma * rng.standard_normal(n_brain, dtype=np.float32)
    out = np.zeros(out_shape, dtype=np.float32)
    out[brain] = np.maximum(np.sqrt(real * real + imag * imag) + gain * np.float32(site.offset),
                            0.0)
    return out


def to_nifti(image: np.ndarray, affine: np.ndarray, *, orientation: str = "RAS",
             dtype: str = "float32") -> nib.Nifti1Image:
    """Wrap a RAS-grid image as NIfTI-1 in another axis orientation and storage dtype.

    The data is flipped/permuted and the affine changed with it, so that every voxel keeps
    its world position: ``nibabel.as_closest_canonical`` gives back ``image`` and ``affine``.
    """
    check_choice(orientation, "orientation", ORIENTATIONS)
    check_choice(dtype, "dtype", DTYPES)
    if dtype == "int16":
        image = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    img = nib.Nifti1Image(image, affine)
    if orientation != "RAS":
        src = axcodes2ornt(nib.aff2axcodes(affine))
        img = img.as_reoriented(ornt_transform(src, axcodes2ornt(tuple(orientation))))
    if dtype == "int16_scaled":
        img.set_data_dtype(np.int16)
    elif dtype == "uint8_scaled":
        img.set_data_dtype(np.uint8)
    hdr = img.header
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"brainrank simulated T1w"
    return img


def encode(img: nib.Nifti1Image, extension: str) -> bytes:
    """Bytes of a single-file NIfTI; gzip level 1 with mtime 0 (reproducible) for .nii.gz."""
    check_choice(extension, "extension", EXTENSIONS)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if extension == ".nii.gz" else raw


def corrupt(img: nib.Nifti1Image, kind: str) -> tuple[bytes, str]:
    """Bytes and extension of a deliberately broken version of ``img`` (see ``CORRUPTIONS``)."""
    check_choice(kind, "kind", tuple(CORRUPTIONS))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if kind == "truncated_gzip":
        blob = encode(nib.Nifti1Image(data, img.affine), ".nii.gz")
        return blob[: int(len(blob) * 0.6)], ".nii.gz"
    if kind == "nan_voxels":
        data = data.copy()
        c = [n // 2 for n in data.shape]
        data[c[0] - 2: c[0] + 2, c[1] - 2: c[1] + 2, c[2] - 2: c[2] + 2] = np.nan
        return encode(nib.Nifti1Image(data, img.affine), ".nii.gz"), ".nii.gz"
    if kind == "constant":
        return encode(nib.Nifti1Image(np.full_like(data, 100.0), img.affine), ".nii.gz"), ".nii.gz"
    if kind == "two_volumes":
        return encode(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine),
                      ".nii.gz"), ".nii.gz"
    # singular_affine: a valid file whose sform (code 1, used by readers) is all zeros.
    blob = nib.Nifti1Image(data, img.affine).to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(blob))
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = 0.0
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    patched = hdr.binaryblock + blob[len(hdr.binaryblock):]
    return gzip.compress(patched, compresslevel=1, mtime=0), ".nii.gz"
