"""`brainrank predict` on one .nii.gz, one .mgz and a folder of images (no ages), through the
real CLI, real nibabel files and the session's temporary Prefect server; the output table
lists the subjects set aside with the reason."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from _tiny_cohort import _head, make_cache

from flows.cli import main
from rankcore.errors import InputError
from rankcore.mri import read_cohort
from rankcore.train.cascade import train_cascade

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

TINY = {"epochs": 1, "batch_size": 4, "num_threads": 1, "rank_loss": "none",
        "backbone": {"growth": [4, 4]}}
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-30.0, -34.0, -26.0]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_inputs")
    cache = make_cache(base, 16)
    train_cascade(cache, base / "model", TINY, val_fraction=0.2)
    return base / "model"


@pytest.fixture(scope="module")
def volume():
    return _head(55.0, np.random.default_rng(7))


def test_predict_one_nifti_and_the_same_image_as_mgz(prefect_server, model, volume, tmp_path,
                                                    capsys):
    nii, mgz = tmp_path / "nii" / "scan_T1w.nii.gz", tmp_path / "mgz" / "scan.mgz"
    nii.parent.mkdir()
    mgz.parent.mkdir()
    nib.save(nib.Nifti1Image(volume, AFFINE), nii)
    nib.save(nib.MGHImage(volume, AFFINE), mgz)
    out = {}
    for name, path in (("nii", nii), ("mgz", mgz)):
        code = main(["predict", str(model), str(path), "--out", str(tmp_path / f"{name}.csv")])
        assert code == 0, capsys.readouterr().err
        assert "predicted 1 of 1 subject(s)" in capsys.readouterr().out
        rows = _rows(tmp_path / f"{name}.csv")
        assert len(rows) == 1 and rows[0]["participant_id"] == "scan"
        assert rows[0]["status"] == "predicted" and rows[0]["age"] == ""
        out[name] = float(rows[0]["predicted_age"])
        assert 0 < out[name] < 120
        assert float(rows[0]["interval_low"]) < out[name] < float(rows[0]["interval_high"])
    # The same voxels and affine, read by nibabel from .mgz: the same brain age.
    assert out["mgz"] == pytest.approx(out["nii"], abs=1e-3)


def test_predict_a_folder_of_images_lists_what_was_set_aside(prefect_server, model, volume,
                                                            tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, AFFINE), folder / "a.nii.gz")
    nib.save(nib.MGHImage(volume[::-1].copy(), AFFINE), folder / "b.mgz")
    nib.save(nib.MGHImage(volume, AFFINE), folder / "a.mgz")  # a second image named a
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not a gzip stream")
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(model), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    assert "predicted 2 of" in capsys.readouterr().out
    table = _rows(tmp_path / "p.csv")
    status = sorted((r["participant_id"], r["status"]) for r in table)
    assert status == [("a", "duplicate_id"), ("a", "predicted"), ("b", "predicted"),
                      ("broken", "unreadable")]
    for r in table:
        assert (r["predicted_age"] != "") == (r["status"] == "predicted")
        assert (r["reason"] != "") == (r["status"] != "predicted")
    dup = next(r for r in table if r["status"] == "duplicate_id")
    assert "a.mgz" in dup["reason"] or "a.nii.gz" in dup["reason"]
    quarantine = _rows(tmp_path / "p.quarantine.csv")
    assert {q["category"] for q in quarantine} == {"unreadable", "duplicate_id"}


def test_images_without_ages_are_refused_where_ages_are_needed(tmp_path, volume):
    nib.save(nib.Nifti1Image(volume, AFFINE), tmp_path / "x.nii.gz")
    nib.save(nib.MGHImage(volume, AFFINE), tmp_path / "y.mgz")
    assert [r.participant_id for r in read_cohort(tmp_path, require_age=False).rows] == \
        ["x", "y"]
    assert len(read_cohort(tmp_path / "x.nii.gz", require_age=False).rows) == 1
    for target in (tmp_path / "x.nii.gz", tmp_path):
        with pytest.raises(InputError, match=r"carries no ages.*write a manifest"):
            read_cohort(target)


def _whole_head(rng: np.random.Generator) -> np.ndarray:
    """A box-and-sphere brain like :func:`_head`'s, inside a dark skull gap and a bright
    scalp, with noisy air: a head that was not skull-stripped (same 30x34x26 grid)."""
    vol = np.zeros((30, 34, 26), np.float32)
    vol[4:26, 4:30, 3:23] = 150.0  # scalp
    vol[6:24, 6:28, 5:21] = 4.0  # skull and CSF
    vol[8:22, 8:26, 7:19] = 60.0  # brain
    vol[13:17, 15:19, 11:15] = 160.0
    return vol + rng.normal(0, 3, vol.shape).astype(np.float32)


def test_predict_sets_a_whole_head_aside_unless_allowed(prefect_server, model, volume,
                                                        tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, AFFINE), folder / "brain.nii.gz")
    nib.save(nib.Nifti1Image(_whole_head(np.random.default_rng(3)), AFFINE),
             folder / "head.nii.gz")
    assert main(["predict", str(model), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    assert "set aside: 1 (not_skull_stripped 1)" in capsys.readouterr().out
    table = {r["participant_id"]: r for r in _rows(tmp_path / "p.csv")}
    assert table["brain"]["status"] == "predicted"
    head = table["head"]
    assert head["status"] == "not_skull_stripped" and head["predicted_age"] == ""
    assert "head.nii.gz: looks like a whole head" in head["reason"]
    assert "skull-strip it first" in head["reason"] and "mri_synthstrip" in head["reason"]
    quarantine = _rows(tmp_path / "p.quarantine.csv")
    assert [q["category"] for q in quarantine] == ["not_skull_stripped"]
    # the user's choice: proceed with the whole head (a cache of its own)
    assert main(["predict", str(model), str(folder), "--out", str(tmp_path / "q.csv"),
                 "--allow-whole-head"]) == 0
    assert "predicted 2 of 2" in capsys.readouterr().out
    assert {r["status"] for r in _rows(tmp_path / "q.csv")} == {"predicted"}
