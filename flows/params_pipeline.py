"""Pydantic model of `brainrank pipeline`: its top-level options and one section per stage."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from flows.params_stages import (
    ALLOW_OUTSIDE_ROOT,
    COHORT,
    GRID,
    EvaluateParams,
    IngestParams,
    PretrainSorterParams,
    SimulateParams,
    TrainParams,
    _Params,
    _posix_path,
)

# ------------------------------------------------------------------------------- pipeline
# The pipeline's sections are the stage models minus what the pipeline decides itself (paths
# inside RUN_DIR, the preprocessing grid, the ranking loss, the Ray address): derived from the
# stage models, so that a new stage option is a pipeline option too, with the same default.


def _section(model: type[BaseModel], name: str, drop: tuple[str, ...], doc: str
             ) -> type[_Params]:
    """A parameters model with ``model``'s fields (types, defaults, bounds) minus ``drop``."""
    fields = {n: (f.annotation, f) for n, f in model.model_fields.items() if n not in drop}
    return create_model(name, __base__=_Params, __doc__=doc, __module__=__name__, **fields)


#: Fields of each stage model that the pipeline sets itself (not options of its sections).
PIPELINE_DERIVED: dict[str, tuple[str, ...]] = {
    "simulate": ("out_dir",),
    "ingest": ("cohort", "cache", "spacing", "shape", "tissue", "max_failed_fraction",
               "allow_outside_root", "require_age", "ray_address", "allow_whole_head"),
    "pretrain": ("out", "ray_address"),
    "train": ("cache", "out", "rank_loss", "sorter", "ray_address", "spacing", "shape",
              "tissue", "test_fraction", "split_seed"),
    "evaluate": ("model_dir", "cache", "out"),
}

PipelineSimulate = _section(
    SimulateParams, "PipelineSimulate", PIPELINE_DERIVED["simulate"],
    "Section `simulate` of the pipeline: the simulated cohort used when no `cohort` is given.")
PipelineIngest = _section(
    IngestParams, "PipelineIngest", PIPELINE_DERIVED["ingest"],
    "Section `ingest`: how subjects are preprocessed (the grid is the top-level `spacing` "
    "and `shape`, tissue measurement the top-level `tissue`).")
PipelinePretrain = _section(
    PretrainSorterParams, "PipelinePretrain", PIPELINE_DERIVED["pretrain"],
    "Section `sorter.pretrain`: the sorter pretrained into RUN_DIR/sorter.safetensors when "
    "`sorter.source` is 'pretrain'.")
PipelineTrain = _section(
    TrainParams, "PipelineTrain", PIPELINE_DERIVED["train"],
    "Section `train`: the cascade (the ranking loss comes from the `sorter` section).")
PipelineEvaluate = _section(
    EvaluateParams, "PipelineEvaluate", PIPELINE_DERIVED["evaluate"],
    "Section `evaluate`: the report on the held-out split.")


class PipelineSorter(_Params):
    """Section `sorter`: the ranking loss the cascade trains with.

    ``source``: "soft" (training-free soft ranks, no sorter: the default of every command, with
    the TrainConfig defaults for the surrogate and its weight), "shipped" (the sorter shipped
    with brainrank named ``name``), "file" (the sorter file ``file``), "pretrain" (pretrain one
    as ``pretrain`` says into RUN_DIR/sorter.safetensors; on Ray Train when
    ``pretrain.workers`` > 1 or a Ray address is given) or "none" (no ranking loss).
    """

    source: Literal["shipped", "file", "pretrain", "soft", "none"] = Field(
        "soft", description="where the rank loss comes from: soft ranks (no sorter), a shipped "
                            "sorter, a sorter file, a pretrained one, or none")
    name: str = Field("pairwise", min_length=1, description="the shipped sorter (source "
                                                            "'shipped')")
    file: str | None = Field(None, description="the sorter file (source 'file')")
    pretrain: PipelinePretrain = Field(default_factory=PipelinePretrain)

    @model_validator(mode="after")
    def _file_with_source_file(self) -> PipelineSorter:
        if (self.file is None) == (self.source == "file"):
            raise ValueError(f"`file` must be given exactly when `source` is 'file' (source "
                             f"{self.source!r}, file {self.file!r})")
        return self


_SECTIONS = ("simulate", "ingest", "sorter", "train", "evaluate")


class PipelineParams(_Params):
    """`brainrank pipeline`: cohort -> ingest -> sorter -> cascade -> evaluation, in RUN_DIR.

    ``out`` is RUN_DIR. Without ``cohort`` the cohort is simulated (section ``simulate``).
    ``spacing``, ``shape``, ``tissue``, ``allow_outside_root``, ``max_failed_fraction`` are the
    ingest options (the pipeline stops when more than that fraction is quarantined). When no cohort
    row is labelled ``test``, about ``test_fraction`` of the unlabelled participants are held
    out as the test split, drawn by a hash of ``split_seed`` and the participant id (stable as
    the cohort grows). ``until`` stops after that stage (e.g. "ingest" for a nightly ingest of
    new subjects into the same RUN_DIR). ``ray_address`` (default:
    the RAY_ADDRESS variable) is the cluster every Ray engine joins; without one Ray starts
    locally when a stage needs it. The sections ``simulate``, ``ingest``, ``sorter``,
    ``train``, ``evaluate`` hold each stage's options (keys as in --config files of the
    stage commands); ``train.options`` / ``train.stage2_options`` reach TrainConfig.
    """

    out: str = Field(min_length=1, description="run folder (a rerun reuses every stage whose "
                                               "inputs did not change)")
    cohort: str | None = Field(None, description=f"{COHORT}; default: simulate one")
    spacing: float = Field(2.0, gt=0, le=8, description="ingest voxel size, mm")
    shape: tuple[int, int, int] = Field((80, 96, 80), description=f"ingest {GRID}")
    tissue: bool = Field(True, description="ingest with tissue measurement (off: intensity "
                                           "volumes only)")
    allow_outside_root: bool = Field(False, description=ALLOW_OUTSIDE_ROOT)
    max_failed_fraction: float = Field(0.5, ge=0, le=1, description="stop (exit 3) when more "
                                       "than this fraction is quarantined")
    ray_address: str | None = Field(None, description="join this Ray cluster (default: "
                                                      "$RAY_ADDRESS; else Ray starts locally "
                                                      "when a stage needs it)")
    test_fraction: float = Field(0.2, gt=0, le=0.5, description="when no cohort row is "
                                 "labelled test, hold out about this share of the participants")
    split_seed: int = Field(0, ge=0, description="seed of the test hold-out's stable hash")
    until: Literal["simulate", "ingest", "sorter", "train", "evaluate"] = Field(
        "evaluate", description="stop after this stage")
    simulate: PipelineSimulate = Field(default_factory=PipelineSimulate)
    ingest: PipelineIngest = Field(default_factory=PipelineIngest)
    sorter: PipelineSorter = Field(default_factory=PipelineSorter)
    train: PipelineTrain = Field(default_factory=PipelineTrain)
    evaluate: PipelineEvaluate = Field(default_factory=PipelineEvaluate)

    _paths = field_validator("out", "cohort")(_posix_path)

    @model_validator(mode="before")
    @classmethod
    def _dashed_section_keys(cls, data: object) -> object:
        # --config files may spell keys with dashes, as the options are spelled.
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name in (*_SECTIONS, "pretrain"):
            section = out.get(name)
            if isinstance(section, dict):
                out[name] = cls._dashed_section_keys(
                    {str(k).replace("-", "_"): v for k, v in section.items()})
        return out

    @field_validator("shape")
    @classmethod
    def _pipeline_grid_fits(cls, v: tuple[int, int, int], info) -> tuple[int, int, int]:
        from rankcore.mri.grid import check_shape  # scipy: imported on use

        return check_shape(v, info.data.get("spacing"))

    @model_validator(mode="after")
    def _stages_validate(self) -> PipelineParams:
        # Build every stage's parameters once, so that a bad combination fails when the
        # configuration is read, not hours later when its stage starts.
        builds = (("simulate", lambda: self.simulate_params("cohort")),
                  ("ingest", lambda: self.ingest_params("cohort", "cache")),
                  ("sorter.pretrain", lambda: self.pretrain_params("sorter.safetensors")),
                  ("train", lambda: self.train_params("cache", "model", "sorter.safetensors")),
                  ("evaluate", lambda: self.evaluate_params("model", "cache", "report")))
        for section, build in builds:
            try:
                build()
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(x) for x in first["loc"])
                loc = f"`{loc}` " if loc else ""
                raise ValueError(f"section `{section}`: {loc}"
                                 f"{first['msg'].removeprefix('Value error, ')}") from None
        return self

    def simulate_params(self, out_dir: str) -> SimulateParams:
        """Parameters of the simulate stage writing into ``out_dir``."""
        return SimulateParams(out_dir=out_dir, **self.simulate.model_dump())

    def ingest_params(self, cohort: str, cache: str, *,
                      allow_outside_root: bool | None = None) -> IngestParams:
        """Parameters of the ingest stage (``allow_outside_root`` overrides the option)."""
        return IngestParams(
            cohort=cohort, cache=cache, spacing=self.spacing, shape=self.shape,
            tissue=self.tissue, max_failed_fraction=self.max_failed_fraction,
            allow_outside_root=(self.allow_outside_root if allow_outside_root is None
                                else allow_outside_root),
            require_age=True, ray_address=self.ray_address, **self.ingest.model_dump())

    def pretrain_params(self, out: str) -> PretrainSorterParams:
        """Parameters of the sorter pretraining (source 'pretrain') writing ``out``."""
        return PretrainSorterParams(out=out, ray_address=self.ray_address,
                                    **self.sorter.pretrain.model_dump())

    def train_params(self, cache: str, out: str, pretrained: str | None = None) -> TrainParams:
        """Parameters of the cascade training; ``pretrained`` is the pretrained sorter file."""
        source = self.sorter.source
        sorter = {"shipped": self.sorter.name, "file": self.sorter.file,
                  "pretrain": pretrained}.get(source)
        rank_loss = "sorter" if source in ("shipped", "file", "pretrain") else source
        return TrainParams(cache=cache, out=out, rank_loss=rank_loss, sorter=sorter,
                           ray_address=self.ray_address, spacing=self.spacing,
                           shape=self.shape, tissue=self.tissue, test_fraction=self.test_fraction,
                           split_seed=self.split_seed, **self.train.model_dump())

    def evaluate_params(self, model_dir: str, cache: str, out: str) -> EvaluateParams:
        """Parameters of the evaluation of ``model_dir`` on ``cache`` into ``out``."""
        return EvaluateParams(model_dir=model_dir, cache=cache, out=out,
                              **self.evaluate.model_dump())
