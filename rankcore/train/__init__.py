"""Training of the cascade: per-worker loops (plain functions) and, lazily, the Ray launcher.

Importing this package imports neither Ray nor ``torch.distributed`` collectives; the Ray
Train launcher lives in :mod:`rankcore.train.ray_train` and is imported on use.
"""

from rankcore.train.cascade import CascadeResult, load_cascade, train_cascade
from rankcore.train.cascade_plan import CascadePlan, default_config, plan_cascade
from rankcore.train.checkpoint import load_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.crossfit import CrossFit, cross_fit_stage1
from rankcore.train.data import SubjectData, encode_sex, stratified_folds
from rankcore.train.loop import StageResult, resolve_device, train_stage
from rankcore.train.predict import evaluate, predict
from rankcore.train.synthetic import synthetic_subjects

__all__ = [
    "CascadePlan",
    "CascadeResult",
    "CrossFit",
    "StageResult",
    "SubjectData",
    "TrainConfig",
    "cross_fit_stage1",
    "default_config",
    "encode_sex",
    "evaluate",
    "load_cascade",
    "load_stage_model",
    "plan_cascade",
    "predict",
    "resolve_device",
    "stratified_folds",
    "synthetic_subjects",
    "train_cascade",
    "train_stage",
]
