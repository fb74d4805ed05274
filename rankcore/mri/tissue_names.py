"""Names of the tissue classes, template regions and tissue features, defined once.

A light module (no imports) so that the cache schema can name its columns without loading
the template or SimpleITK.
"""

from __future__ import annotations

__all__ = ["CLASSES", "POSE_FEATURES", "REGIONS", "TISSUE_FEATURES"]

#: Tissue classes, in channel order (channels 1..3 of a cached subject).
CLASSES = ("gm", "wm", "csf")
#: Template regions (see rankcore.mri.regions); label i + 1 is REGIONS[i].
REGIONS = ("ventricles", "periventricular", "deep", "brainstem", "cerebellum", "temporal",
           "frontal", "posterior", "central")

_GLOBAL = (*(f"{c}_fraction" for c in CLASSES), *(f"{c}_ml" for c in CLASSES), "brain_ml",
           "gm_mean", "csf_mean", "noise_sd")
_REGIONAL = tuple(f"{r}_{q}" for r in REGIONS for q in (*CLASSES, "intensity"))
_AFFINE = (*(f"affine_{i}{j}" for i in range(3) for j in range(4)), "affine_scale",
           "template_dice")

#: Tissue features, in stored order. ``<c>_fraction``: class c's share of the brain mask;
#: ``<c>_ml``: its volume (ml); ``brain_ml``: the mask's volume on the output grid;
#: ``gm_mean``, ``csf_mean``, ``noise_sd``: pure-class means and noise SD relative to the WM
#: mean; ``<region>_<c>``: class c's share of a template region; ``<region>_intensity``: the
#: region's mean bias-corrected intensity relative to the WM mean; ``affine_ij``: the 3x4
#: subject-to-MNI affine (mm); ``affine_scale``: the cube root of its determinant;
#: ``template_dice``: overlap of the aligned template brain with the subject's mask.
TISSUE_FEATURES = _GLOBAL + _REGIONAL + _AFFINE
#: The entries of the subject-to-MNI affine (rotation, shear, scale and translation in the
#: scanner's coordinates): where the head lay and where the scanner put its origin, not
#: anatomy. The closed-form prior leaves them out (``rankcore.train.prior``).
POSE_FEATURES = _AFFINE[:12]
