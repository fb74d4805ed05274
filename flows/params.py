"""Every command's parameter model, found in one place (flows.cli, flows.job, flows.deployed
and flows.serve look a command's model up here by name).

The models live in :mod:`flows.params_stages` (the stage commands),
:mod:`flows.params_pipeline` (the pipeline and its sections) and :mod:`flows.params_jobs`
(submit, serve); those modules import only downwards, this one only re-exports.
"""

from __future__ import annotations

from flows.params_jobs import JobCommand, ServeParams, SubmitParams
from flows.params_pipeline import (
    PIPELINE_DERIVED,
    PipelineEvaluate,
    PipelineIngest,
    PipelineParams,
    PipelinePretrain,
    PipelineSimulate,
    PipelineSorter,
    PipelineTrain,
)
from flows.params_stages import (
    CardParams,
    EvaluateParams,
    IngestParams,
    PredictParams,
    PretrainSorterParams,
    SimulateParams,
    TrainParams,
)

__all__ = ["PIPELINE_DERIVED", "CardParams", "EvaluateParams", "IngestParams", "JobCommand",
           "PipelineEvaluate", "PipelineIngest", "PipelineParams", "PipelinePretrain",
           "PipelineSimulate", "PipelineSorter", "PipelineTrain", "PredictParams",
           "PretrainSorterParams", "ServeParams", "SimulateParams", "SubmitParams",
           "TrainParams"]
