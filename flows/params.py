"""Pydantic models of every flow's parameters (the CLI, --config files and deployments share them).

Paths are strings so that the models serialise to JSON for Prefect deployments unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulateParams(_Params):
    """`brainrank simulate`: write a simulated BIDS-style cohort."""

    out_dir: str
    subjects: int = Field(200, ge=2, le=100_000)
    seed: int = 0
    spacing: float = Field(2.0, ge=1, le=4)
    sites: int = Field(3, ge=1, le=64)
    corrupt: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, le=256)


class IngestParams(_Params):
    """`brainrank ingest`: validate, preprocess and cache a cohort.

    ``batch_size``: subjects per batch (= per shard, = per retry); None (the default) lets
    the library choose (``rankcore.cache.plan.default_batch_size``: up to 64, fewer so that
    each of ``workers`` gets a batch). It changes how the cache is cut into shards, not what it
    holds. No CLI option: set it in --config.
    """

    cohort: str
    cache: str
    spacing: float = Field(2.0, gt=0, le=8)
    shape: tuple[int, int, int] = (80, 96, 80)
    workers: int = Field(1, ge=1, le=256)
    engine: Literal["local", "ray"] = "local"
    max_failed_fraction: float = Field(0.5, ge=0, le=1)
    allow_outside_root: bool = False
    require_age: bool = True
    ray_address: str | None = None
    batch_size: int | None = Field(None, ge=1)

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s <= 0 for s in v):
            raise ValueError(f"must be three positive integers, got {v}")
        return v


class PretrainSorterParams(_Params):
    """`brainrank pretrain-sorter`: train a learned sorter on synthetic sequences.

    ``batch_size`` is per worker. ``engine`` ``auto`` trains in this process with one worker
    and no ``ray_address``, on Ray Train otherwise. ``target_strength`` is the σ of the
    smoothed targets (rankcore.train.sorter; 0 = exact ranks). ``sizes``, ``loss``,
    ``target_strength``, ``eval_every``, ``eval_rows`` and ``engine`` have no CLI option:
    set them in --config. ``fail_at_step`` is a test hook (one worker fails once after it).
    """

    out: str
    kind: str = "pairwise"
    seq_len: int = Field(32, ge=2, le=4096)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    workers: int = Field(1, ge=1, le=256)
    gpu: bool = False
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(200, ge=1)
    max_failures: int = Field(2, ge=0)
    storage_path: str | None = None
    ray_address: str | None = None
    sizes: dict[str, int] = Field(default_factory=dict)
    loss: Literal["l1", "mse"] = "l1"
    target_strength: float = Field(0.05, ge=0, le=10)
    eval_every: int = Field(200, ge=1)
    eval_rows: int = Field(16, ge=1, le=1024)
    engine: Literal["auto", "local", "ray"] = "auto"
    fail_at_step: int | None = Field(None, ge=1)


class TrainParams(_Params):
    """`brainrank train`: train the two-stage cascade on a cache into a model folder.

    ``rank_loss`` defaults to "soft" (training-free soft Spearman); giving ``sorter`` (a sorter
    file or a shipped sorter's name) selects "sorter". ``epochs`` (per job) and ``k_folds``
    default to the CPU sizing of rankcore.train.cascade_plan.default_config. ``workers``: with
    engine "local", the fold and final stage-1 jobs run side by side in this many processes;
    with engine "ray", the Ray Train workers of every stage. ``spacing`` / ``shape`` pick the
    cache's preprocessing config when it holds several. When no cached row is labelled
    ``test``, ``test_fraction`` of the unlabelled participants are held out as the test split
    by the pipeline's stable hash of ``split_seed`` and the participant id (0: train on
    everything; `brainrank evaluate` then has no unseen subjects). ``val_fraction``,
    ``options`` (more TrainConfig keys, e.g. ``lr`` or ``backbone``) and ``stage2_options``
    (stage-2 overrides) have no CLI option: set them in --config.
    """

    cache: str
    out: str
    rank_loss: Literal["sorter", "soft", "none"] | None = None
    sorter: str | None = Field(None, validate_default=True)
    epochs: int = Field(15, ge=1, le=10_000)
    batch_size: int = Field(16, ge=2, le=4096)
    workers: int = Field(1, ge=1, le=256)
    gpu: bool = False
    seed: int = Field(0, ge=0)
    k_folds: int = Field(3, ge=2, le=20)
    val_fraction: float = Field(0.1, ge=0, le=0.5)
    test_fraction: float = Field(0.2, ge=0, le=0.5)
    split_seed: int = Field(0, ge=0)
    engine: Literal["local", "ray"] = "local"
    storage_path: str | None = None
    ray_address: str | None = None
    spacing: float | None = Field(None, gt=0, le=8)
    shape: tuple[int, int, int] | None = None
    options: dict = Field(default_factory=dict)
    stage2_options: dict = Field(default_factory=dict)

    @field_validator("sorter")
    @classmethod
    def _sorter_matches_rank_loss(cls, v: str | None, info) -> str | None:
        rank_loss = info.data.get("rank_loss")
        if v is not None and rank_loss not in (None, "sorter"):
            raise ValueError(f"is only used with rank_loss 'sorter' (rank_loss is {rank_loss!r})")
        if v is None and rank_loss == "sorter":
            raise ValueError("must name a sorter file or a shipped sorter when rank_loss is "
                             "'sorter'")
        return v

    @field_validator("shape")
    @classmethod
    def _positive_train_shape(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"must be three positive integers, got {v}")
        return v

    @field_validator("options")
    @classmethod
    def _no_duplicate_options(cls, v: dict) -> dict:
        dup = sorted(set(v) & {"epochs", "batch_size", "seed", "rank_loss", "sorter"})
        if dup:
            raise ValueError(f"must not repeat top-level options ({', '.join(dup)}): set them "
                             "directly")
        return v


class EvaluateParams(_Params):
    """`brainrank evaluate`: score a trained cascade on one split of a cache, write a report.

    ``split`` is the cache's split label ("test" by default) or "all". ``n_boot``, ``seed`` and
    ``level`` set the bootstrap intervals (``n_boot`` 0: none). ``store_bias`` also stores the
    validation-fitted correction in MODEL_DIR/bias.json for `brainrank predict --bias-correct`.
    """

    model_dir: str
    cache: str
    out: str
    split: str = Field("test", min_length=1)
    n_boot: int = Field(1000, ge=0, le=100_000)
    seed: int = Field(0, ge=0)
    level: float = Field(0.95, gt=0, lt=1)
    batch_size: int | None = Field(None, ge=1)
    gpu: bool = False
    store_bias: bool = True


class CardParams(_Params):
    """`brainrank card`: print a model's card (``as_json``, option --json: the raw card.json)."""

    model_dir: str = Field(min_length=1)
    as_json: bool = False


class PredictParams(_Params):
    """`brainrank predict`: apply a trained cascade to a cohort (BIDS root or manifest).

    ``out`` ends in .csv or .parquet. ``cache`` is the preprocessing cache (default: a folder
    ``<out without extension>.cache`` next to the output). ``spacing`` / ``shape``, when given,
    must be the model's (a mismatch is refused). ``bias_correct`` applies MODEL_DIR/bias.json
    (or ``bias_file``) in the ``bias_method`` form. The run exits 3 when more than
    ``max_failed_fraction`` of the cohort is set aside. ``max_spacing_ratio`` and
    ``batch_size`` have no CLI option: set them in --config.
    """

    model_dir: str
    cohort: str
    out: str
    bias_correct: bool = False
    bias_method: Literal["beheshti", "cole"] = "beheshti"
    bias_file: str | None = None
    cache: str | None = None
    spacing: float | None = Field(None, gt=0, le=8)
    shape: tuple[int, int, int] | None = None
    workers: int = Field(1, ge=1, le=256)
    engine: Literal["local", "ray"] = "local"
    allow_outside_root: bool = False
    batch_size: int | None = Field(None, ge=1)
    gpu: bool = False
    max_spacing_ratio: float = Field(2.0, ge=1)
    max_failed_fraction: float = Field(1.0, ge=0, le=1)

    @field_validator("shape")
    @classmethod
    def _positive_predict_shape(cls, v: tuple[int, int, int] | None
                                ) -> tuple[int, int, int] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"must be three positive integers, got {v}")
        return v


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
    "ingest": ("cohort", "cache", "spacing", "shape", "max_failed_fraction",
               "allow_outside_root", "require_age", "ray_address"),
    "pretrain": ("out", "ray_address"),
    "train": ("cache", "out", "rank_loss", "sorter", "ray_address", "spacing", "shape"),
    "evaluate": ("model_dir", "cache", "out"),
}

PipelineSimulate = _section(
    SimulateParams, "PipelineSimulate", PIPELINE_DERIVED["simulate"],
    "Section `simulate` of the pipeline: the simulated cohort used when no `cohort` is given.")
PipelineIngest = _section(
    IngestParams, "PipelineIngest", PIPELINE_DERIVED["ingest"],
    "Section `ingest`: how subjects are preprocessed (the grid is the top-level `spacing` "
    "and `shape`).")
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

    source: Literal["shipped", "file", "pretrain", "soft", "none"] = "soft"
    name: str = Field("pairwise", min_length=1)
    file: str | None = None
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
    ``spacing``, ``shape``, ``allow_outside_root``, ``max_failed_fraction`` are the ingest
    options (the pipeline stops when more than that fraction is quarantined). When no cohort
    row is labelled ``test``, about ``test_fraction`` of the unlabelled participants are held
    out as the test split, drawn by a hash of ``split_seed`` and the participant id (stable as
    the cohort grows). ``until`` stops after that stage (e.g. "ingest" for a nightly ingest of
    new subjects into the same RUN_DIR). ``ray_address`` (default:
    the RAY_ADDRESS variable) is the cluster every Ray engine joins; without one Ray starts
    locally when a stage needs it. The sections ``simulate``, ``ingest``, ``sorter``,
    ``train``, ``evaluate`` hold each stage's options (keys as in --config files of the
    stage commands); ``train.options`` / ``train.stage2_options`` reach TrainConfig.
    """

    out: str = Field(min_length=1)
    cohort: str | None = None
    spacing: float = Field(2.0, gt=0, le=8)
    shape: tuple[int, int, int] = (80, 96, 80)
    allow_outside_root: bool = False
    max_failed_fraction: float = Field(0.5, ge=0, le=1)
    ray_address: str | None = None
    test_fraction: float = Field(0.2, gt=0, le=0.5)
    split_seed: int = Field(0, ge=0)
    until: Literal["simulate", "ingest", "sorter", "train", "evaluate"] = "evaluate"
    simulate: PipelineSimulate = Field(default_factory=PipelineSimulate)
    ingest: PipelineIngest = Field(default_factory=PipelineIngest)
    sorter: PipelineSorter = Field(default_factory=PipelineSorter)
    train: PipelineTrain = Field(default_factory=PipelineTrain)
    evaluate: PipelineEvaluate = Field(default_factory=PipelineEvaluate)

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
    def _positive_pipeline_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s <= 0 for s in v):
            raise ValueError(f"must be three positive integers, got {v}")
        return v

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
                raise ValueError(f"section `{section}`: `{loc}` "
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
            max_failed_fraction=self.max_failed_fraction,
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
                           shape=self.shape, test_fraction=self.test_fraction,
                           split_seed=self.split_seed, **self.train.model_dump())

    def evaluate_params(self, model_dir: str, cache: str, out: str) -> EvaluateParams:
        """Parameters of the evaluation of ``model_dir`` on ``cache`` into ``out``."""
        return EvaluateParams(model_dir=model_dir, cache=cache, out=out,
                              **self.evaluate.model_dump())


#: Commands a Ray job can run (`brainrank submit COMMAND`).


# Job submission and serving parameters live in their own module; re-exported here so
# every command's model is found in flows.params.
from flows.params_jobs import JobCommand, ServeParams, SubmitParams  # noqa: E402, F401
