"""Applying a trained cascade: its preprocessing contract, predictions, stored bias correction.

Public API:

- :func:`predict_cohort` — ingest a new cohort with the model's preprocessing and predict it
- :func:`predict_cascade` — stage-1 and final ages of a SubjectData, each subject once
- :func:`model_preprocess`, :func:`check_preprocess` — the model's PreprocessConfig
- :func:`save_bias`, :func:`load_bias` — MODEL_DIR/bias.json (validation-fitted correction)
"""

from rankcore.inference.bias_store import BIAS_FILE, load_bias, save_bias
from rankcore.inference.cohort import (
    PredictionSummary,
    check_prediction,
    default_cache_dir,
    predict_cohort,
)
from rankcore.inference.model import check_preprocess, model_preprocess, predict_cascade

__all__ = [
    "BIAS_FILE",
    "PredictionSummary",
    "check_prediction",
    "check_preprocess",
    "default_cache_dir",
    "load_bias",
    "model_preprocess",
    "predict_cascade",
    "predict_cohort",
    "save_bias",
]
