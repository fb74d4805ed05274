"""3-D CNN models: the ScaleDense-style backbone (stage 1) and the two-stage cascade (stage 2)."""

from rankcore.models.backbone import AgeRegressor, ScaleDense, count_parameters
from rankcore.models.cascade import Cascade, CascadeConfig, CorrectionRegressor, discretise
from rankcore.models.config import FEATURE_NORMS, BackboneConfig

__all__ = [
    "FEATURE_NORMS",
    "AgeRegressor",
    "BackboneConfig",
    "Cascade",
    "CascadeConfig",
    "CorrectionRegressor",
    "ScaleDense",
    "count_parameters",
    "discretise",
]
