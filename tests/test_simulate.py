"""The cohort simulator: determinism, layout, file quirks, broken files and the ageing signal.

Cohorts are simulated at 3 mm (the code path is the same as at 2 mm, 3.4x fewer voxels).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from rankcore.errors import InputError
from rankcore.mri import ageing
from rankcore.mri.mni import template_maps
from rankcore.mri.scanner import CORRUPTIONS, ORIENTATIONS, head_pose, site_profile
from rankcore.mri.simulate import (
    TRUTH_RELPATH,
    SimulationConfig,
    irreducible_floor,
    read_truth,
    render_subject,
    sample_subject,
    simulate_cohort,
)

SPACING = 3.0
# Lateral-ventricle search box (MNI mm) used to measure ventricles in the images.
VENTRICLE_BOX = ((-30.0, 30.0), (-45.0, 25.0), (-5.0, 35.0))


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """16 subjects with quirks (two full blocks of every quirk plan) + 5 broken files."""
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "cohort", subjects=16, seed=3,
                           spacing=SPACING, corrupt=5)


@pytest.fixture(scope="module")
def ageing_cohort(tmp_path_factory) -> Path:
    """24 subjects from one site without quirks, to measure the ageing signal in the images."""
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "ageing", subjects=24, seed=0,
                           spacing=SPACING, sites=1, quirks=False)


def _valid_rows(root: Path) -> list[dict[str, str]]:
    return [r for r in read_truth(root) if r["corruption"] == "n/a"]


# --- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"subjects": 0}, {"subjects": 2.5}, {"seed": -1}, {"spacing": 0.5}, {"spacing": True},
    {"age_range": (50, 20)}, {"age_range": (10, 120)}, {"age_range": "old"}, {"sites": 0},
    {"sigma_delta": -1.0}, {"quirks": "yes"}, {"corrupt": -2},
])
def test_config_rejects_bad_values(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InputError, match=f"`{name}` must be"):
        SimulationConfig(**kwargs)


def test_workers_validated(tmp_path):
    with pytest.raises(InputError, match="`workers` must be"):
        simulate_cohort(tmp_path / "x", subjects=1, workers=0)
    assert not (tmp_path / "x").exists()


# --- determinism ----------------------------------------------------------------------------

def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers(tmp_path):
    a = simulate_cohort(tmp_path / "a", subjects=2, seed=5, spacing=SPACING, corrupt=1)
    b = simulate_cohort(tmp_path / "b", subjects=2, seed=5, spacing=SPACING, corrupt=1,
                        workers=2)
    c = simulate_cohort(tmp_path / "c", subjects=1, seed=6, spacing=SPACING)
    ta, tb, tc = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if ta[k] != tb[k]] == []
    image = "sub-0001/anat/"
    assert [v for k, v in ta.items() if k.startswith(image)] != \
        [v for k, v in tc.items() if k.startswith(image)]


def test_subject_does_not_depend_on_cohort_size(cohort, tmp_path):
    small = simulate_cohort(tmp_path / "small", subjects=4, seed=3, spacing=SPACING)
    for row in _valid_rows(small):
        assert (small / row["path"]).read_bytes() == (cohort / row["path"]).read_bytes()
    big_rows = {r["participant_id"]: r for r in _valid_rows(cohort)}
    for row in _valid_rows(small):
        assert row == big_rows[row["participant_id"]]
    cfg_small, cfg_big = SimulationConfig(subjects=3, seed=9), SimulationConfig(subjects=900,
                                                                               seed=9)
    assert sample_subject(cfg_small, 2) == sample_subject(cfg_big, 2)
    assert sample_subject(cfg_small, 2) != sample_subject(cfg_small, 1)


# --- layout and tables ----------------------------------------------------------------------

def test_tables_are_consistent(cohort):
    participants = _read_tsv(cohort / "participants.tsv")
    truth = read_truth(cohort)
    assert list(participants[0]) == ["participant_id", "age", "sex", "site"]
    assert len(participants) == len(truth) == 16 + 5
    assert [p["participant_id"] for p in participants] == [t["participant_id"] for t in truth]
    for p, t in zip(participants, truth):
        assert (p["age"], p["sex"], p["site"]) == (t["age"], t["sex"], t["site"])
        assert (cohort / t["path"]).is_file()
        assert t["path"].startswith(f"{t['participant_id']}/anat/{t['participant_id']}_T1w.nii")
        age = float(t["age_exact"])
        assert float(t["brain_age"]) == pytest.approx(age + float(t["delta"]), abs=2e-4)
        # Reported ages: 0.1 y, or whole years at last birthday.
        reported = float(p["age"])
        if "." in p["age"]:
            assert abs(age - reported) <= 0.05 + 1e-9
        else:
            assert 0 <= age - reported < 1.0
    assert any("." not in p["age"] for p in participants)
    assert len({p["site"] for p in participants}) >= 3
    assert {p["sex"] for p in participants} == {"F", "M"}
    # The truth never leaks into the table a training run reads.
    assert "brain_age" not in (cohort / "participants.tsv").read_text()
    assert (cohort / "dataset_description.json").is_file()
    assert (cohort / TRUTH_RELPATH).is_file()


def test_ages_from_89_are_censored_and_whole_years_are_floored():
    cfg = SimulationConfig(age_range=(80.0, 98.0), seed=4)
    params = [sample_subject(cfg, i) for i in range(40)]
    old = [p for p in params if p.age >= 89]
    assert old and all(p.age_text == "89+" and p.age_reported == 89.0 for p in old)
    whole = [p for p in params if p.age < 89 and "." not in p.age_text]
    assert whole and all(int(p.age_text) == np.floor(p.age) for p in whole)
    plain = SimulationConfig(age_range=(20.0, 80.0), quirks=False)
    assert all("." in sample_subject(plain, i).age_text for i in range(16))


def test_irreducible_floor(cohort):
    rows = _valid_rows(cohort)
    expected = np.mean([abs(float(r["brain_age"]) - float(r["age"])) for r in rows])
    assert irreducible_floor(cohort / TRUTH_RELPATH) == pytest.approx(expected)
    assert irreducible_floor(cohort) == pytest.approx(expected)  # the root works too
    # Over many subjects a perfect model's MAE is E|delta| = sigma * sqrt(2/pi) ~ 0.8 sigma.
    cfg = SimulationConfig(subjects=800, sigma_delta=2.5, quirks=False)
    deltas = np.array([sample_subject(cfg, i).delta for i in range(800)])
    assert np.mean(np.abs(deltas)) == pytest.approx(2.5 * np.sqrt(2 / np.pi), rel=0.08)
    assert np.std(deltas) == pytest.approx(2.5, rel=0.08)


def test_rerun_is_idempotent_and_foreign_folders_are_refused(cohort, tmp_path, caplog):
    before = {p: p.stat().st_mtime_ns for p in cohort.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="rankcore.mri.simulate"):
        assert simulate_cohort(cohort, subjects=16, seed=3, spacing=SPACING, corrupt=5) == cohort
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in cohort.rglob("*") if p.is_file()} == before
    with pytest.raises(InputError, match="same parameters"):
        simulate_cohort(cohort, subjects=17, seed=3, spacing=SPACING, corrupt=5)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="`out_dir` must be empty"):
        simulate_cohort(user, subjects=1)
    assert (user / "notes.txt").read_text() == "keep me"


# --- files ----------------------------------------------------------------------------------

def _raw_header(path: Path) -> nib.Nifti1Header:
    blob = path.read_bytes()
    if path.name.endswith(".gz"):
        blob = gzip.decompress(blob)
    return nib.Nifti1Header.from_fileobj(io.BytesIO(blob))


def test_every_file_loads_and_quirks_are_present(cohort):
    orientations, dtypes, exts, grids, scaled = set(), set(), set(), set(), 0
    for row in _valid_rows(cohort):
        path = cohort / row["path"]
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
        assert data.ndim == 3 and np.isfinite(data).all() and data.max() > data.min()
        assert np.isfinite(img.affine).all() and abs(np.linalg.det(img.affine[:3, :3])) > 0.1
        assert "".join(nib.aff2axcodes(img.affine)) == row["orientation"]
        voxel = np.linalg.norm(img.affine[:3, :3], axis=0)
        assert sorted(np.round(voxel, 3)) == sorted(float(v) for v in row["voxel_mm"].split("x"))
        orientations.add(row["orientation"])
        dtypes.add(img.get_data_dtype().name)
        exts.add(".nii.gz" if path.name.endswith(".gz") else ".nii")
        hdr = _raw_header(path)
        slope = float(hdr["scl_slope"])
        if row["dtype"].endswith("_scaled"):
            assert np.isfinite(slope) and slope not in (0.0, 1.0)
            scaled += 1
        oblique = (np.abs(img.affine[:3, :3]) > 1e-6).sum(axis=0).max() > 1
        grids.add("oblique" if oblique else row["grid"])
        assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert orientations == set(ORIENTATIONS)
    assert dtypes == {"float32", "int16", "uint8"}
    assert exts == {".nii", ".nii.gz"}
    assert grids == {"iso", "fine", "aniso", "oblique"}
    assert scaled >= 4


def test_broken_files_fail_as_announced(cohort):
    broken = [r for r in read_truth(cohort) if r["corruption"] != "n/a"]
    assert {r["corruption"] for r in broken} == set(CORRUPTIONS)
    for row in broken:
        assert row["expected_category"] == CORRUPTIONS[row["corruption"]]
        path = cohort / row["path"]
        kind = row["corruption"]
        if kind == "truncated_gzip":
            with pytest.raises((OSError, EOFError, ValueError)):
                nib.load(path).get_fdata()
            continue
        img = nib.load(path)
        if kind == "singular_affine":
            assert np.linalg.det(img.affine[:3, :3]) == 0
        elif kind == "two_volumes":
            assert img.shape[3:] == (2,)
        elif kind == "nan_voxels":
            assert np.isnan(img.get_fdata()).any()
        elif kind == "constant":
            assert np.ptp(img.get_fdata()) == 0


def _brain_centroid_world(img: nib.Nifti1Image) -> np.ndarray:
    idx = np.argwhere(np.asarray(img.dataobj) > 0)
    return (idx @ img.affine[:3, :3].T + img.affine[:3, 3]).mean(axis=0)


def test_reoriented_and_regridded_files_hold_the_same_anatomy():
    params = replace(sample_subject(SimulationConfig(seed=11), 4), orientation="RAS",
                     grid="iso", dtype="float32")
    ras, _, _ = render_subject(params, SPACING)
    ras_data = np.asarray(ras.dataobj)
    for orientation in ORIENTATIONS[1:]:
        img, _, _ = render_subject(replace(params, orientation=orientation), SPACING)
        assert "".join(nib.aff2axcodes(img.affine)) == orientation
        canon = nib.as_closest_canonical(img)
        np.testing.assert_allclose(canon.affine, ras.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(canon.dataobj), ras_data)
    # Scaled integers round-trip within half a quantisation step.
    img, _, _ = render_subject(replace(params, dtype="int16_scaled"), SPACING)
    back = nib.Nifti1Image.from_bytes(img.to_bytes())
    np.testing.assert_allclose(back.get_fdata(), ras_data, atol=back.dataobj.slope / 2 + 1e-3)
    # Other grids: same brain in world space (centroid within a voxel's interpolation error).
    centre = _brain_centroid_world(ras)
    for grid in ("fine", "aniso", "oblique"):
        img, _, voxel = render_subject(replace(params, grid=grid), SPACING)
        assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), voxel)
        assert np.linalg.norm(_brain_centroid_world(img) - centre) < 0.5


def test_default_spacing_grid():
    params = sample_subject(SimulationConfig(quirks=False), 0)
    img, tissue, voxel = render_subject(params, 2.0)
    assert voxel == (2.0, 2.0, 2.0)
    assert all(70 <= n <= 110 for n in img.shape)
    assert 500 < tissue.gm_ml < 1100 and 5 < tissue.ventricle_ml < 300


def test_site_effects_are_fixed_per_site_and_differ_between_sites():
    a, b = site_profile(0), site_profile(1)
    assert a == site_profile(0) and a != b and a.name == "site1"
    for s in (site_profile(k) for k in range(8)):
        assert 20 <= s.snr_range[0] < s.snr_range[1] <= 40
        assert 0.6 < s.gm_contrast < 0.9 and 0.1 < s.csf_contrast < 0.45


# --- the ageing model -----------------------------------------------------------------------

def _rate(fn, age: float) -> float:
    """Annual rate of change (%/y) of a volume factor, by central differences."""
    h = 0.01
    return 100 * (np.log(fn(age + h)) - np.log(fn(age - h))) / (2 * h)


def test_ageing_rates_match_the_literature_curves():
    assert ageing.gm_retained(20.0) == 1.0 and ageing.gm_retained(25.0) == 1.0
    for age, rate in ((35, -0.2), (60, -0.5), (80, -0.8)):
        assert _rate(ageing.gm_retained, age) == pytest.approx(rate, abs=0.01)
    for age, rate in ((40, 0.0), (70, -0.5), (80, -1.0)):
        assert _rate(ageing.wm_factor, age) == pytest.approx(rate, abs=0.01)
    for age, rate in ((40, 1.5), (70, 3.0), (80, 5.0)):
        assert _rate(ageing.ventricle_factor, age) == pytest.approx(rate, abs=0.01)
    wm = ageing.wm_factor(np.arange(20.0, 90.0))
    assert 30 <= 20 + int(np.argmax(wm)) <= 50  # inverted U


def test_aged_tissue_conserves_volume_and_follows_the_factors():
    tpl = template_maps(SPACING)
    young = ageing.age_tissue(tpl, 25.0)
    for b in (25.0, 50.0, 80.0):
        for mult in (0.5, 2.0):
            t = ageing.age_tissue(tpl, b, mult)
            np.testing.assert_allclose(t.gm + t.wm + t.csf, tpl.mask, atol=1e-5)
            assert min(t.gm.min(), t.wm.min(), t.csf.min()) >= 0
            assert np.all(t.ventricles <= t.csf + 1e-6)
            expected = young.ventricle_ml * float(ageing.ventricle_factor(b)) * mult
            assert t.ventricle_ml == pytest.approx(expected, rel=0.01)
    old = ageing.age_tissue(tpl, 80.0)
    # GM loss goes to CSF; the ventricles only displace a little GM (caudate).
    assert old.gm_ml / young.gm_ml == pytest.approx(float(ageing.gm_retained(80.0)), rel=0.02)
    assert old.csf_ml > young.csf_ml + 200


def test_tissue_is_lost_at_its_border_with_csf_not_inside_every_voxel():
    """An old brain keeps pure tissue far from CSF: atrophy shows as more CSF next to CSF,
    not as every GM and WM voxel diluted (which a segmentation would read as darker tissue)."""
    tpl = template_maps(SPACING)
    young, old = ageing.age_tissue(tpl, 25.0), ageing.age_tissue(tpl, 85.0)
    assert old.gm_ml / young.gm_ml == pytest.approx(float(ageing.gm_retained(85.0)), rel=0.02)
    assert old.wm_ml / young.wm_ml == pytest.approx(float(ageing.wm_factor(85.0)), rel=0.03)
    border = ageing._csf_border(tpl)
    deep_wm = (tpl.wm > 0.9) & (border < np.percentile(border[tpl.wm > 0.9], 50))
    assert np.median(old.wm[deep_wm] / young.wm[deep_wm]) > 0.97  # untouched
    near = (tpl.gm > 0.3) & (border > np.percentile(border[tpl.gm > 0.3], 75))
    far = (tpl.gm > 0.3) & (border < np.percentile(border[tpl.gm > 0.3], 25))
    lost_near = 1 - old.gm[near].sum() / young.gm[near].sum()
    lost_far = 1 - old.gm[far].sum() / young.gm[far].sum()
    assert lost_near > 3 * lost_far


def test_truth_volumes_follow_brain_age(ageing_cohort):
    rows = _valid_rows(ageing_cohort)
    b = [float(r["brain_age"]) for r in rows]
    icv = [sum(float(r[k]) for k in ("gm_ml", "wm_ml", "csf_ml")) for r in rows]
    gm_fraction = [float(r["gm_ml"]) / v for r, v in zip(rows, icv)]
    assert spearmanr(gm_fraction, b)[0] < -0.9
    assert spearmanr([float(r["ventricle_ml"]) for r in rows], b)[0] > 0.4


def _image_measures(img: nib.Nifti1Image) -> tuple[float, float]:
    """(CSF-like fraction of the brain, CSF-like ml in the ventricle box) of one image."""
    data = img.get_fdata(dtype=np.float32)
    brain = data > 0
    values = data[brain] / np.percentile(data[brain], 90)  # ~ WM level
    xyz = np.argwhere(brain) @ img.affine[:3, :3].T + img.affine[:3, 3]
    box = np.all([(xyz[:, a] > lo) & (xyz[:, a] < hi)
                  for a, (lo, hi) in enumerate(VENTRICLE_BOX)], axis=0)
    dark = values < 0.5
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000
    return float(dark.mean()), float((dark & box).sum() * voxel_ml)


def test_images_carry_the_ageing_signal(ageing_cohort):
    rows = _valid_rows(ageing_cohort)
    b = np.array([float(r["brain_age"]) for r in rows])
    measures = np.array([_image_measures(nib.load(ageing_cohort / r["path"])) for r in rows])
    dark_fraction, ventricles = measures.T
    assert spearmanr(dark_fraction, b)[0] > 0.5
    assert spearmanr(ventricles, b)[0] > 0.4
    truth_ventricles = [float(r["ventricle_ml"]) for r in rows]
    assert spearmanr(ventricles, truth_ventricles)[0] > 0.9


def test_older_brain_age_darkens_the_cortex_and_grows_the_ventricles():
    """Same subject, same scan, only the brain age changed: GM ribbon darker, ventricles larger."""
    tpl = template_maps(SPACING)
    params = replace(sample_subject(SimulationConfig(seed=2, quirks=False), 1),
                     ventricle_multiplier=1.0)
    pose = head_pose(tpl.brain_centre, params.head_scale, np.array(params.rotation_deg),
                     np.array(params.translation_mm))
    ribbon = np.argwhere(tpl.gm > 0.7) @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    ribbon = ribbon @ pose[:3, :3].T + pose[:3, 3]
    results = []
    for b in (30.0, 55.0, 80.0):
        img, _, _ = render_subject(replace(params, brain_age=b), SPACING)
        data = img.get_fdata(dtype=np.float32)
        inv = np.linalg.inv(img.affine)
        ijk = np.rint(ribbon @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        results.append((data[tuple(ijk.T)].mean(), _image_measures(img)[1]))
    ribbon_mean, ventricles = np.array(results).T
    assert np.all(np.diff(ribbon_mean) < 0)
    assert np.all(np.diff(ventricles) > 0) and ventricles[-1] > 2 * ventricles[0]
