"""rankcore.mri.read_cohort: BIDS roots and manifests, row quarantine, parity, outside_root."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankcore.errors import InputError
from rankcore.mri import CohortRow, read_cohort


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), path)
    return path


def _tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


PARTICIPANTS = [
    ["participant_id", "age", "sex", "site", "handedness"],
    ["sub-01", "30.5", "M", "A", "R"],
    ["sub-02", "89+", "female", "B", "n/a"],
    ["sub-03", "n/a", "F", "A", "L"],
    ["sub-04", "40", "M", "B", "R"],      # no image
    ["sub-05", "55", "m", "C", "R"],      # two sessions, ages in sessions.tsv
    ["sub-07", "abc", "F", "A", "R"],
    ["sub-08", "-3", "M", "A", "R"],
    ["sub-01", "30.5", "M", "A", "R"],    # repeated, identical: collapsed with a note
    ["09", "60", "F", "C", "L"],          # BIDS id without its prefix
]


@pytest.fixture
def bids(tmp_path) -> Path:
    root = tmp_path / "ds"
    _tsv(root / "participants.tsv", PARTICIPANTS)
    for rel in ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz",
                "sub-02/anat/sub-02_T1w.nii", "sub-03/anat/sub-03_T1w.nii.gz",
                "sub-05/ses-1/anat/sub-05_ses-1_T1w.nii.gz",
                "sub-05/ses-2/anat/sub-05_ses-2_T1w.nii.gz",
                "sub-06/anat/sub-06_T1w.nii.gz", "sub-07/anat/sub-07_T1w.nii.gz",
                "sub-08/anat/sub-08_T1w.nii.gz", "sub-09/anat/sub-09_T1w.nii.gz",
                "derivatives/sub-01/anat/sub-01_T1w.nii.gz"]:
        _image(root / rel)
    (root / "sub-04" / "anat").mkdir(parents=True)
    (root / "sub-02" / "anat" / "sub-02_T2w.nii.gz").write_bytes(b"")  # not a T1w: ignored
    _tsv(root / "sub-05" / "sub-05_sessions.tsv",
         [["session_id", "age"], ["ses-1", "55"], ["ses-2", "57.5"]])
    return root


def _categories(cohort) -> list[tuple[str, str]]:
    return [(q.participant_id, q.category) for q in cohort.quarantine]


def test_bids_rows_and_quarantine(bids):
    cohort = read_cohort(bids)
    assert cohort.kind == "bids" and cohort.root == bids.resolve()
    assert [r.key for r in cohort.rows] == ["sub-01", "sub-02", "sub-05/ses-1", "sub-05/ses-2",
                                            "sub-09"]
    r01, r02, r05a, r05b, r09 = cohort.rows
    assert r01 == CohortRow("sub-01", bids / "sub-01/anat/sub-01_T1w.nii.gz", None, 30.5, False,
                            "M", "A", None, {"handedness": "R"})
    assert (r02.age, r02.age_censored, r02.sex, r02.extra) == (89.0, True, "F", {})
    assert r02.path.name == "sub-02_T1w.nii"
    assert (r05a.age, r05b.age, r05a.sex, r05a.site) == (55.0, 57.5, "M", "C")
    assert r09.participant_id == "sub-09" and r09.age == 60.0
    assert sorted(_categories(cohort)) == sorted([
        ("sub-01", "duplicate_id"), ("sub-03", "bad_age"),
        ("sub-04", "missing_file"), ("sub-06", "bad_age"), ("sub-07", "bad_age"),
        ("sub-08", "bad_age")])
    msgs = {(q.participant_id, q.category, q.source): q.message for q in cohort.quarantine}
    run2 = str(bids / "sub-01/anat/sub-01_run-2_T1w.nii.gz")
    assert "kept sub-01_T1w.nii.gz" in msgs["sub-01", "duplicate_id", run2]
    assert "'abc' is not a number" in msgs["sub-07", "bad_age", str(bids / "sub-07/anat/"
                                                                     "sub-07_T1w.nii.gz")]
    assert len(cohort.notes) == 1 and "line 9" in cohort.notes[0]  # the repeated sub-01 row


def test_bids_without_required_ages(bids):
    cohort = read_cohort(bids, require_age=False)
    keys = [r.key for r in cohort.rows]
    assert keys == sorted(keys) and "sub-03" in keys and "sub-06" in keys
    by_key = {r.key: r for r in cohort.rows}
    assert by_key["sub-03"].age is None and by_key["sub-03"].sex == "F"
    assert by_key["sub-06"].age is None and by_key["sub-06"].sex is None
    # missing ages are fine for prediction; malformed ones are still refused
    assert sorted(_categories(cohort)) == sorted([
        ("sub-01", "duplicate_id"), ("sub-04", "missing_file"),
        ("sub-07", "bad_age"), ("sub-08", "bad_age")])


def _manifest_records(root: Path) -> list[dict]:
    return [
        {"participant_id": "sub-01", "path": "sub-01/anat/sub-01_T1w.nii.gz", "age": "30.5",
         "sex": "M", "site": "A", "session": "", "handedness": "R"},
        {"participant_id": "sub-02", "path": str(root / "sub-02/anat/sub-02_T1w.nii"),
         "age": "89+", "sex": "female", "site": "B", "session": "n/a", "handedness": "n/a"},
        {"participant_id": "sub-05", "path": "sub-05/ses-2/anat/sub-05_ses-2_T1w.nii.gz",
         "age": "57.5", "sex": "m", "site": "C", "session": "ses-2", "handedness": "R"},
        {"participant_id": "sub-05", "path": "sub-05/ses-1/anat/sub-05_ses-1_T1w.nii.gz",
         "age": "55", "sex": "M", "site": "C", "session": "ses-1", "handedness": "R"},
        {"participant_id": "sub-09", "path": "./sub-09/anat/sub-09_T1w.nii.gz", "age": "60",
         "sex": "F", "site": "C", "session": "", "handedness": "L"},
    ]


def _write_manifest(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    sep = "," if path.suffix == ".csv" else "\t"
    cols = list(records[0])
    lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_manifest_matches_bids(bids, suffix):
    manifest = _write_manifest(bids / f"cohort{suffix}", _manifest_records(bids))
    from_manifest = read_cohort(manifest)
    assert from_manifest.kind == "manifest" and from_manifest.quarantine == ()
    assert from_manifest.rows == read_cohort(bids).rows


def test_parquet_with_numeric_ages_and_nulls(tmp_path):
    _image(tmp_path / "a.nii.gz")
    _image(tmp_path / "b.nii.gz")
    table = pa.table({"participant_id": ["a", "b"], "path": ["a.nii.gz", "b.nii.gz"],
                      "age": pa.array([41.0, float("nan")]), "split": ["train", None]})
    pq.write_table(table, tmp_path / "m.parquet")
    cohort = read_cohort(tmp_path / "m.parquet")
    assert [(r.participant_id, r.age, r.split) for r in cohort.rows] == [("a", 41.0, "train")]
    assert [(q.participant_id, q.category) for q in cohort.quarantine] == [("b", "bad_age")]
    assert [r.age for r in read_cohort(tmp_path / "m.parquet", require_age=False).rows] == [
        41.0, None]


def test_manifest_row_problems(tmp_path):
    for name in ["a.nii.gz", "b.nii.gz", "c.nii.gz", "e.nii.gz"]:
        _image(tmp_path / "img" / name)
    (tmp_path / "img" / "dir.nii.gz").mkdir()
    _write_manifest(tmp_path / "m.csv", [
        {"participant_id": "a", "path": "img/a.nii.gz", "age": "20", "split": "train",
         "session": "1"},
        {"participant_id": "a", "path": "img/b.nii.gz", "age": "21", "split": "Val",
         "session": "2"},
        {"participant_id": "a", "path": "img/c.nii.gz", "age": "22", "split": "", "session": "1"},
        {"participant_id": "d", "path": "img/nope.nii.gz", "age": "30", "split": "test",
         "session": ""},
        {"participant_id": "e", "path": "img/e.nii.gz", "age": "1e9", "split": "", "session": ""},
        {"participant_id": "f", "path": "", "age": "3", "split": "", "session": ""},
        {"participant_id": "g", "path": "img/dir.nii.gz", "age": "3", "split": "",
         "session": ""},
    ])
    cohort = read_cohort(tmp_path / "m.csv")
    # a/1 appears twice with other ages and images: both rows are set aside, a/2 is kept
    assert [(r.key, r.age, r.split) for r in cohort.rows] == [("a/2", 21.0, "val")]
    got = {(q.participant_id, q.category, q.source): q for q in cohort.quarantine}
    img = tmp_path / "img"
    assert set(got) == {("a", "duplicate_id", str(img / "a.nii.gz")),
                        ("a", "duplicate_id", str(img / "c.nii.gz")),
                        ("d", "missing_file", str(img / "nope.nii.gz")),
                        ("e", "bad_age", str(img / "e.nii.gz")),
                        ("f", "missing_file", str(tmp_path / "m.csv") + " line 7"),
                        ("g", "missing_file", str(img / "dir.nii.gz"))}
    dup = got["a", "duplicate_id", str(img / "c.nii.gz")]
    assert "m.csv line 4" in dup.message and "lines 2, line 4" not in dup.message
    assert "age 20 / 22" in dup.message and "line 2" in dup.message
    assert "is not a file" in got["g", "missing_file", str(img / "dir.nii.gz")].message


@pytest.fixture
def outside(tmp_path) -> tuple[Path, Path]:
    """A cohort folder and an image next to it (outside it), reached three ways."""
    root = tmp_path / "cohort"
    _image(root / "in.nii.gz")
    elsewhere = _image(tmp_path / "elsewhere" / "out.nii.gz")
    (root / "link.nii.gz").symlink_to(elsewhere)
    (root / "inner_link.nii.gz").symlink_to(root / "in.nii.gz")
    _write_manifest(root / "m.tsv", [
        {"participant_id": "in", "path": "in.nii.gz", "age": "1"},
        {"participant_id": "inner", "path": "inner_link.nii.gz", "age": "2"},
        {"participant_id": "dotdot", "path": "../elsewhere/out.nii.gz", "age": "3"},
        {"participant_id": "symlink", "path": "link.nii.gz", "age": "4"},
        {"participant_id": "absolute", "path": str(elsewhere), "age": "5"},
    ])
    return root, elsewhere


def test_outside_root_refused(outside):
    root, elsewhere = outside
    cohort = read_cohort(root / "m.tsv")
    assert [r.participant_id for r in cohort.rows] == ["in", "inner"]
    assert sorted(_categories(cohort)) == [("absolute", "outside_root"),
                                           ("dotdot", "outside_root"),
                                           ("symlink", "outside_root")]
    link = next(q for q in cohort.quarantine if q.participant_id == "symlink")
    assert str(elsewhere.resolve()) in link.message and "allow-outside-root" in link.message


def test_outside_root_allowed(outside):
    root, elsewhere = outside
    cohort = read_cohort(root / "m.tsv", allow_outside_root=True)
    assert cohort.quarantine == ()
    paths = {r.participant_id: r.path for r in cohort.rows}
    assert paths["symlink"] == root.resolve() / "link.nii.gz"  # the link, as written
    assert paths["dotdot"] == elsewhere.resolve()
    assert paths["absolute"] == elsewhere


def test_bids_symlink_leaving_the_dataset(bids, tmp_path):
    target = _image(tmp_path / "store" / "x.nii.gz")
    (bids / "sub-10" / "anat").mkdir(parents=True)
    (bids / "sub-10" / "anat" / "sub-10_T1w.nii.gz").symlink_to(target)
    with open(bids / "participants.tsv", "a") as f:
        f.write("sub-10\t50\tF\tA\tR\n")
    assert ("sub-10", "outside_root") in _categories(read_cohort(bids))
    assert "sub-10" in [r.key for r in read_cohort(bids, allow_outside_root=True).rows]


def test_bids_without_participants_tsv(tmp_path):
    _image(tmp_path / "ds" / "sub-1" / "anat" / "sub-1_T1w.nii.gz")
    with pytest.raises(InputError, match=r"participants\.tsv"):
        read_cohort(tmp_path / "ds")
    cohort = read_cohort(tmp_path / "ds", require_age=False)
    assert [(r.participant_id, r.age) for r in cohort.rows] == [("sub-1", None)]


@pytest.mark.parametrize("content,match", [
    ("participant_id,age\na,3\n", "missing required column.*path"),
    ("participant_id,path,age,Age\na,x,3,4\n", "appears more than once"),
    ("participant_id,path,age,split\na,x,3,training\n", "line 2.*`split`.*'training'"),
    ("participant_id,path,age\n,x,3\n", "line 2.*`participant_id` is empty"),
    ("participant_id,path,age\na,x,3,4,5\n", "line 2 has 5 fields"),
    ("", "empty"),
])
def test_bad_manifest_tables(tmp_path, content, match):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        read_cohort(path)
    assert str(path) in str(e.value)


def test_unreadable_and_unknown_inputs(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read the table"):
        read_cohort(tmp_path / "bad.parquet")
    (tmp_path / "latin.csv").write_bytes("participant_id,path,age\nJos\xe9,x,3\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.csv: cannot read the table"):
        read_cohort(tmp_path / "latin.csv")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"neither a BIDS folder, a manifest file .* nor an image"):
        read_cohort(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_cohort(tmp_path / "nothing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match=r"participants\.tsv"):
        read_cohort(tmp_path / "emptydir")
    with pytest.raises(InputError, match="neither a BIDS folder"):
        read_cohort(tmp_path / "emptydir", require_age=False)


def test_participants_tsv_passed_instead_of_its_folder(bids):
    with pytest.raises(InputError, match="pass its folder"):
        read_cohort(bids / "participants.tsv")


def test_bids_bad_split_names_the_row(bids):
    rows = [[*r, "split" if i == 0 else "train"] for i, r in enumerate(PARTICIPANTS)]
    rows[3][-1] = "holdout"
    _tsv(bids / "participants.tsv", rows)
    with pytest.raises(InputError, match=r"participants\.tsv line 4.*'holdout'"):
        read_cohort(bids)


def test_age_parsing_edge_cases(tmp_path):
    _image(tmp_path / "a.nii")
    ages = {"p1": " 42 ", "p2": "90+", "p3": "N/A", "p4": "inf", "p5": "150", "p6": "0",
            "p7": "12.5"}
    _write_manifest(tmp_path / "m.csv", [{"participant_id": k, "path": "a.nii", "age": v,
                                          "session": ""} for k, v in ages.items()])
    cohort = read_cohort(tmp_path / "m.csv", require_age=False)
    got = {r.participant_id: (r.age, r.age_censored) for r in cohort.rows}
    assert got == {"p1": (42.0, False), "p2": (90.0, True), "p3": (None, False),
                   "p6": (0.0, False), "p7": (12.5, False)}
    assert sorted(_categories(cohort)) == [("p4", "bad_age"), ("p5", "bad_age")]
    assert os.path.samefile(cohort.rows[0].path, tmp_path / "a.nii")
