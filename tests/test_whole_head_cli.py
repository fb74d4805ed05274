"""`brainrank ingest` of a cohort with one whole-head (not skull-stripped) scan, through the
real CLI, real NIfTI files and the session's temporary Prefect server: the scan is
quarantined as ``not_skull_stripped`` with a message naming it and saying what to do, and
``--allow-whole-head`` ingests it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from rankcore.mri.head_phantom import add_head
from rankcore.mri.phantom import SimulationConfig, render_subject, sample_subject

pytestmark = pytest.mark.prefect


@pytest.fixture()
def manifest(tmp_path):
    """sub-01..sub-03 simulated skull-stripped brains (4 mm); sub-04 the same kind of brain
    inside a head."""
    root = tmp_path / "cohort"
    root.mkdir()
    lines = ["participant_id,path,age"]
    for i in range(1, 5):
        params = sample_subject(SimulationConfig(subjects=1, seed=i, spacing=4.0,
                                                 quirks=False), 0)
        img = render_subject(params, spacing=4.0)[0]
        if i == 4:
            head, affine = add_head(np.asarray(img.dataobj), img.affine, seed=i)
            img = nib.Nifti1Image(head, affine)
        nib.save(img, root / f"sub-{i:02d}_T1w.nii.gz")
        lines.append(f"sub-{i:02d},sub-{i:02d}_T1w.nii.gz,{30 + 10 * i}")
    (root / "cohort.csv").write_text("\n".join(lines) + "\n")
    return root / "cohort.csv"


def test_ingest_quarantines_a_whole_head_with_what_to_do(prefect_server, manifest, tmp_path,
                                                         capsys):
    args = ["ingest", str(manifest), "--spacing", "4", "--shape", "40", "48", "40",
            "--no-tissue"]
    assert main([*args, "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "ingested 3, reused 0, quarantined 1 of 4" in out
    assert "quarantined by category: not_skull_stripped 1" in out
    table = next((tmp_path / "cache").glob("*/quarantine.parquet"))
    (row,) = pq.read_table(table).to_pylist()
    assert row["participant_id"] == "sub-04" and row["category"] == "not_skull_stripped"
    assert row["message"].startswith(f"{manifest.parent / 'sub-04_T1w.nii.gz'}: looks like a "
                                     "whole head, not a skull-stripped brain")
    for hint in ("HD-BET", "mri_synthstrip", "bet", "--allow-whole-head"):
        assert hint in row["message"]
    # the user's choice: ingest it as it is (a cache of its own)
    assert main([*args, "--cache", str(tmp_path / "allowed"), "--allow-whole-head"]) == 0
    assert "ingested 4, reused 0, quarantined 0 of 4" in capsys.readouterr().out
