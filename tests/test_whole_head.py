"""Whole-head (not skull-stripped) detection: simulated brains vs the same brains with a head
around them (rankcore.mri.head_phantom), nilearn's brain-extracted MNI template, and the
quarantine it leads to in preprocessing (category ``not_skull_stripped``)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from rankcore.errors import QuarantineError
from rankcore.mri import PreprocessConfig, preprocess_volume
from rankcore.mri.head_phantom import HeadLayers, add_head
from rankcore.mri.phantom import SimulationConfig, render_subject, sample_subject
from rankcore.mri.whole_head import MAX_SHELL_CONTRAST, volume_evidence

CONFIG = PreprocessConfig(spacing=4.0, shape=(40, 48, 40), tissue=False)


def _brain(seed: int, spacing: float = 4.0) -> nib.Nifti1Image:
    params = sample_subject(SimulationConfig(subjects=4, seed=seed, spacing=spacing,
                                             quirks=False), seed % 4)
    return render_subject(params, spacing)[0]


@pytest.fixture(scope="module", params=[0, 1, 2])
def brain(request) -> nib.Nifti1Image:
    return _brain(request.param)


HEADS = {
    "noisy air": HeadLayers(),
    "zero air, bright marrow": HeadLayers(background="zero", marrow=0.7),
    "dim scalp, thin skull, no neck": HeadLayers(scalp_mm=5.0, scalp=0.7, skull_mm=3.0,
                                                 neck=None),
}


def test_a_skull_stripped_brain_is_not_a_whole_head(brain):
    ev = volume_evidence(np.asarray(brain.dataobj), brain.affine, CONFIG.spacing)
    assert not ev.whole_head, ev
    assert ev.shell_contrast < 0 and ev.outside_ml == 0.0


@pytest.mark.parametrize("layers", list(HEADS.values()), ids=list(HEADS))
def test_the_same_brain_inside_a_head_is_a_whole_head(brain, layers):
    head, affine = add_head(np.asarray(brain.dataobj), brain.affine, layers, seed=3)
    ev = volume_evidence(head, affine, CONFIG.spacing)
    assert ev.whole_head, ev
    assert ev.shell_contrast > MAX_SHELL_CONTRAST  # the size-free rule alone catches it


def test_preprocessing_quarantines_a_whole_head_with_what_to_do(brain):
    head, affine = add_head(np.asarray(brain.dataobj), brain.affine, seed=1)
    with pytest.raises(QuarantineError) as err:
        preprocess_volume(head, affine, CONFIG, source="/data/sub-07_T1w.nii.gz")
    assert err.value.category == "not_skull_stripped"
    msg = str(err.value)
    assert msg.startswith("/data/sub-07_T1w.nii.gz: looks like a whole head")
    for hint in ("skull-strip it first", "HD-BET", "mri_synthstrip", "--allow-whole-head"):
        assert hint in msg
    # allowed: processed as before, and the log says so
    pv = preprocess_volume(head, affine, dataclasses.replace(CONFIG, allow_whole_head=True))
    assert any(a.startswith("whole head kept as it is") for a in pv.actions)
    assert pv.data.shape == CONFIG.shape


def test_the_brain_extracted_mni_template_passes():
    from rankcore.mri.mni import _FILES, _data_dir

    img = nib.load(str(_data_dir() / _FILES["t1"]))
    ev = volume_evidence(np.asarray(img.dataobj), img.affine, 2.0)
    assert not ev.whole_head, ev


def test_allow_whole_head_names_its_own_cache_and_leaves_old_digests_alone():
    base = PreprocessConfig()
    assert "allow_whole_head" not in base.to_dict()
    allowed = PreprocessConfig(allow_whole_head=True)
    assert allowed.to_dict()["allow_whole_head"] is True
    assert allowed.digest() != base.digest()
    assert PreprocessConfig(**{**allowed.to_dict(), "shape": (80, 96, 80)}) == allowed
    with pytest.raises(ValueError, match="`allow_whole_head` must be true or false"):
        PreprocessConfig(allow_whole_head="yes")


def test_a_large_brain_with_no_shell_is_not_a_whole_head():
    """A skull-stripped simulated brain of the study cohort enclosed 2811 ml (shell contrast
    -0.64) and was quarantined by the first volume bound (2800 ml): volume alone decides only
    well above any brain; a head's shell still decides below it."""
    from rankcore.mri.whole_head import MAX_BRAIN_ML, HeadEvidence

    assert not HeadEvidence(head_ml=2811.0, outside_ml=10.0, shell_contrast=-0.64).whole_head
    assert HeadEvidence(head_ml=2644.0, outside_ml=900.0, shell_contrast=0.21).whole_head
    assert HeadEvidence(head_ml=MAX_BRAIN_ML + 100, outside_ml=900.0,
                        shell_contrast=0.0).whole_head
