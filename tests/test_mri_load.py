"""rankcore.mri.load: NIfTI reading, header checks before voxels, every quarantine category."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rankcore.errors import QuarantineError, ShapeError
from rankcore.mri import PreprocessConfig, check_affine, inspect_header, load_volume

SHAPE = (7, 8, 9)
CONFIG = PreprocessConfig(spacing=2.0, shape=(8, 8, 8), tissue=False)


def _affine() -> np.ndarray:
    a = np.diag([-1.5, 1.25, 2.0, 1.0])  # LAS, anisotropic
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def _data(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _write(path: Path, data: np.ndarray, affine=None, *, nifti2: bool = False,
           patch: dict | None = None) -> Path:
    """Save with nibabel, then overwrite header fields byte-exactly (nibabel would 'fix' them)."""
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = klass(data, _affine() if affine is None else affine)
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(img, plain)
    if patch:
        with plain.open("r+b") as f:
            hdr = klass.header_class.from_fileobj(f)
            for key, value in patch.items():
                hdr[key] = value
            f.seek(0)
            f.write(hdr.binaryblock)
    if path.name.endswith(".gz"):
        with plain.open("rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
    return path


@pytest.mark.parametrize("name,nifti2", [("a.nii", False), ("a.nii.gz", False),
                                         ("a.nii", True), ("a.nii.gz", True)])
def test_load_round_trip(tmp_path, name, nifti2):
    data = _data()
    path = _write(tmp_path / name, data, nifti2=nifti2)
    out, affine, info = load_volume(path, CONFIG)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data)
    np.testing.assert_allclose(affine, _affine(), atol=1e-6)
    assert info.format == ("NIfTI-2" if nifti2 else "NIfTI-1")
    assert info.orientation == "LAS"
    np.testing.assert_allclose(info.spacing, (1.5, 1.25, 2.0))
    assert info.shape == SHAPE and info.affine_source == "sform"


def test_int16_scaling_is_applied(tmp_path):
    raw = np.random.default_rng(1).integers(-300, 3000, SHAPE).astype(np.int16)
    path = _write(tmp_path / "s.nii.gz", raw, patch={"scl_slope": 0.25, "scl_inter": -7.0})
    out, _, info = load_volume(path, CONFIG)
    assert info.dtype == "int16" and (info.scl_slope, info.scl_inter) == (0.25, -7.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, raw * 0.25 - 7.0, rtol=1e-6)


def test_four_d_with_one_volume_becomes_3d(tmp_path):
    data = _data()
    path = _write(tmp_path / "v.nii.gz", data[..., None])
    out, _, info = load_volume(path, CONFIG)
    assert info.shape == (*SHAPE, 1) and out.shape == SHAPE
    np.testing.assert_array_equal(out, data)


def test_qform_used_when_sform_code_is_zero(tmp_path):
    path = _write(tmp_path / "q.nii", _data(), patch={"sform_code": 0, "qform_code": 1,
                                                       "srow_x": [9, 9, 9, 9]})
    _, affine, info = load_volume(path, CONFIG)
    assert info.affine_source == "qform"
    np.testing.assert_allclose(affine, _affine(), atol=1e-5)


def test_inspect_header_reads_no_voxels(tmp_path):
    """A .nii.gz cut in half has a good header: inspect passes, loading says `unreadable`."""
    path = _write(tmp_path / "t.nii.gz", _data((30, 31, 32)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    info = inspect_header(path, CONFIG)
    assert info.spatial_shape == (30, 31, 32)
    with pytest.raises(QuarantineError) as e:
        load_volume(path, CONFIG)
    assert e.value.category == "unreadable" and "t.nii.gz" in str(e.value)


def _too_large(tmp_path):
    return _write(tmp_path / "big.nii", _data(),
                  patch={"dim": [3, 30000, 30000, 30000, 1, 1, 1, 1]})


def _truncated_nii(tmp_path):
    path = _write(tmp_path / "cut.nii", _data((20, 20, 20)))
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _not_gzip(tmp_path):
    path = _write(tmp_path / "plain.nii", _data())
    return Path(shutil.move(path, tmp_path / "plain.nii.gz"))


def _text(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is not an image\n" * 40)
    return path


def _header_cut(tmp_path):
    path = _write(tmp_path / "h.nii.gz", _data())
    path.write_bytes(path.read_bytes()[:40])
    return path


def _corrupt_gzip(tmp_path):
    path = _write(tmp_path / "z.nii.gz", _data((30, 31, 32)))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    return path


def _pair(tmp_path):
    return _write(tmp_path / "pair.nii", _data(), patch={"magic": b"ni1"})


def _complex(tmp_path):
    return _write(tmp_path / "c.nii", (_data() + 1j).astype(np.complex64))


CASES = {
    "missing_file": [lambda p: p / "nope.nii.gz"],
    "unreadable": [_truncated_nii, _not_gzip, _corrupt_gzip, _text, _header_cut, _pair, _complex,
                   lambda p: _write(p / "x.nii", _data()).rename(p / "x.img") and p / "x.img"],
    "wrong_dims": [lambda p: _write(p / "d2.nii", _data((7, 8))),
                   lambda p: _write(p / "d4.nii.gz", _data((7, 8, 9, 3))),
                   lambda p: _write(p / "slice.nii", _data((7, 8, 1)))],
    "too_large": [_too_large],
    "bad_affine": [
        lambda p: _write(p / "noaff.nii", _data(), patch={"sform_code": 0, "qform_code": 0}),
        lambda p: _write(p / "nan.nii", _data(), patch={"srow_x": [np.nan, 0, 0, 0]}),
        lambda p: _write(p / "sing.nii.gz", _data(), patch={"srow_y": [-1.5, 0, 0, 0]}),
        lambda p: _write(p / "quat.nii", _data(),
                         patch={"sform_code": 0, "qform_code": 1, "quatern_b": 5.0}),
    ],
    "nonfinite": [lambda p: _write(p / "nan.nii.gz", np.where(_data() > 130, np.nan, _data())),
                  lambda p: _write(p / "inf.nii", np.full(SHAPE, np.inf, np.float32))],
    "empty": [lambda p: _write(p / "const.nii.gz", np.full(SHAPE, 3.0, np.float32))],
}


@pytest.mark.parametrize("category,make", [(c, m) for c, ms in CASES.items() for m in ms])
def test_every_load_category_from_a_real_file(tmp_path, category, make):
    path = make(tmp_path)
    with pytest.raises(QuarantineError) as e:
        load_volume(path, CONFIG)
    assert e.value.category == category, str(e.value)
    assert path.name in str(e.value)


def test_too_large_is_refused_without_allocating(tmp_path):
    path = _too_large(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(QuarantineError, match="max_voxels") as e:
            inspect_header(path, CONFIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.category == "too_large"
    assert peak < 5 * 2**20  # the header promises 100 TiB of float32


def test_max_voxels_comes_from_the_config(tmp_path):
    path = _write(tmp_path / "a.nii", _data())
    inspect_header(path, CONFIG)
    with pytest.raises(QuarantineError) as e:
        inspect_header(path, PreprocessConfig(max_voxels=int(np.prod(SHAPE)) - 1, tissue=False))
    assert e.value.category == "too_large"


def test_check_affine():
    np.testing.assert_array_equal(check_affine(_affine().tolist(), "x"), _affine())
    with pytest.raises(ShapeError, match="4x4"):
        check_affine(np.eye(3), "x")
    bad = _affine()
    bad[3] = [0, 0, 1, 1]
    with pytest.raises(QuarantineError, match="bottom row"):
        check_affine(bad, "x")
    flat = _affine()
    flat[:3, 2] = flat[:3, 0] * (1 + 1e-9)
    with pytest.raises(QuarantineError, match="singular"):
        check_affine(flat, "x")


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
@pytest.mark.parametrize("slope", [0.0212928, 1.9062493, 3.0e33, 1e-40, 7.0])
def test_float32_scaling_shortcut_has_the_float64_bits(dtype, slope):
    """With scl_inter 0 and a float32 slope, one float32 multiply rounds the exact product
    once, as the float64 computation does: every stored value, overflow and subnormals
    included, gives the same bits."""
    from rankcore.mri.load import _float32_product_exact, _scale_into

    slope = float(np.float32(slope))
    if dtype == "float32":
        voxels = np.random.default_rng(0).normal(0, 1e3, 40_000).astype(np.float32)
        extremes = None
    else:
        info = np.iinfo(dtype)
        voxels = np.arange(info.min, info.max + 1).astype(dtype)
        extremes = (float(info.min), float(info.max))
    voxels = np.asfortranarray(voxels.reshape(-1, 1, 1))
    assert _float32_product_exact(voxels.dtype, slope, 0.0, extremes)
    assert not _float32_product_exact(voxels.dtype, slope, 1.5, extremes)
    assert not _float32_product_exact(voxels.dtype, 0.1, 0.0, extremes)  # not a float32
    fast = np.empty(voxels.shape, np.float32, order="F")
    _scale_into(fast, voxels, slope, 0.0, extremes)
    with np.errstate(over="ignore"):
        slow = (voxels.astype(np.float64) * slope).astype(np.float32)
    np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
def test_load_from_bytes_already_read_equals_load_from_the_file(tmp_path, name):
    from rankcore.mri.load import read_source

    path = _write(tmp_path / name, _data())
    raw, st = read_source(path)
    assert st.st_size == len(raw) == path.stat().st_size
    data, affine, info = load_volume(path, CONFIG, raw=raw)
    ref, ref_affine, ref_info = load_volume(path, CONFIG)
    np.testing.assert_array_equal(data, ref)
    np.testing.assert_array_equal(affine, ref_affine)
    assert info.orientation == ref_info.orientation and data.flags.f_contiguous
    with pytest.raises(QuarantineError, match=r"truncated|cannot read") as e:
        load_volume(path, CONFIG, raw=raw[: len(raw) // 2])
    assert e.value.category == "unreadable"
