"""Pydantic models of every flow's parameters (the CLI, --config files and deployments share them).

Paths are strings so that the models serialise to JSON for Prefect deployments unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rankcore.mri.grid import check_shape


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _posix_path(value: str | None, info: ValidationInfo) -> str | None:
    """A folder or file on a POSIX file system: a path as given, a file:// URI as its path;
    any other URI is refused with why (rankcore.locations.local_path)."""
    from rankcore.errors import InputError
    from rankcore.locations import local_path

    if value is None:
        return None
    try:
        return str(local_path(value, info.field_name))
    except InputError as exc:
        raise ValueError(str(exc)) from None


class SimulateParams(_Params):
    """`brainrank simulate`: write a simulated BIDS-style cohort.

    ``anatomy``: deform each subject's anatomy by its own smooth random warp of RMS
    ``warp_sd_mm`` mm (rankcore.mri.anatomy); off, every brain is the template's anatomy.
    """

    out_dir: str
    subjects: int = Field(200, ge=2, le=100_000)
    seed: int = 0
    spacing: float = Field(2.0, ge=1, le=4)
    sites: int = Field(3, ge=1, le=64)
    corrupt: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, le=256)
    anatomy: bool = True
    warp_sd_mm: float = Field(2.5, ge=0, le=4)

    _paths = field_validator("out_dir")(_posix_path)


class IngestParams(_Params):
    """`brainrank ingest`: validate, preprocess and cache a cohort.

    ``batch_size``: subjects per batch (= per shard, = per retry); None (the default) lets
    the library choose (``rankcore.cache.plan.default_batch_size``: up to 64, fewer so that
    each of ``workers`` gets a batch). It changes how the cache is cut into shards, not what it
    holds. No CLI option: set it in --config. ``allow_whole_head``: process images that look
    like whole heads (not skull-stripped) as they are instead of quarantining them
    (``not_skull_stripped``); they go into a cache of their own (rankcore.mri.PreprocessConfig).
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
    tissue: bool = True
    allow_whole_head: bool = False
    ray_address: str | None = None
    batch_size: int | None = Field(None, ge=1)

    _paths = field_validator("cohort", "cache")(_posix_path)

    @field_validator("shape")
    @classmethod
    def _grid_fits(cls, v: tuple[int, int, int], info) -> tuple[int, int, int]:
        return check_shape(v, info.data.get("spacing"))


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

    _paths = field_validator("out")(_posix_path)  # the sorter file; storage_path takes URIs


class TrainParams(_Params):
    """`brainrank train`: train the two-stage cascade on a cache into a model folder.

    ``rank_loss`` defaults to "soft" (training-free soft Spearman); giving ``sorter`` (a sorter
    file or a shipped sorter's name) selects "sorter". ``epochs`` (per job) and ``batch_size``
    None (the default) take the library's CPU sizing
    (rankcore.train.cascade_plan.default_config, which also sets the early-stopping patience);
    ``k_folds`` defaults to the same sizing. ``workers``: with engine "local", the fold and
    final stage-1 jobs run side by side in this many processes; with engine "ray", the Ray Train
    workers of every stage. ``spacing`` / ``shape`` pick the cache's preprocessing config when
    it holds several, and ``tissue`` (None: either) whether that config measured tissue; several
    caches matching is refused. When no cached row is labelled ``test``, ``test_fraction`` of
    the unlabelled participants are held out as the test split by the pipeline's stable hash of
    ``split_seed`` and the participant id (0: train on everything; `brainrank evaluate` then
    has no unseen subjects). ``val_fraction``, ``options`` (more TrainConfig keys, e.g. ``lr``
    or ``backbone``) and ``stage2_options`` (stage-2 overrides) have no CLI option: set them in
    --config.
    """

    cache: str
    out: str
    rank_loss: Literal["sorter", "soft", "none"] | None = None
    sorter: str | None = Field(None, validate_default=True)
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=2, le=4096)
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
    tissue: bool | None = None
    options: dict = Field(default_factory=dict)
    stage2_options: dict = Field(default_factory=dict)
    allow_incomplete_cache: bool = False

    _paths = field_validator("cache", "out")(_posix_path)

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
        return check_shape(v)

    @field_validator("options")
    @classmethod
    def _no_duplicate_options(cls, v: dict) -> dict:
        dup = sorted(set(v) & {"epochs", "batch_size", "seed", "rank_loss", "sorter"})
        if dup:
            raise ValueError(f"must not repeat top-level options ({', '.join(dup)}): set them "
                             "directly")
        return v

    def sizing(self) -> dict[str, int]:
        """``epochs`` and ``batch_size`` where given (the rest is the library's default)."""
        return {k: v for k, v in (("epochs", self.epochs), ("batch_size", self.batch_size))
                if v is not None}

    @model_validator(mode="after")
    def _options_build_configs(self) -> TrainParams:
        # Unknown or bad TrainConfig keys fail when the parameters are read, not when (in a
        # pipeline, after ingest) the training stage starts.
        from rankcore.train.cascade_plan import default_config
        from rankcore.train.config import TrainConfig

        for name, extra in (("options", {}), ("stage2_options", self.stage2_options)):
            try:
                base = default_config(**self.options, **self.sizing(), seed=self.seed,
                                      rank_loss=self.rank_loss or (
                                          "sorter" if self.sorter else "soft"),
                                      sorter=self.sorter)
                TrainConfig.from_dict({**base.to_dict(), **extra})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"`{name}` must hold TrainConfig keys and values: "
                                 f"{exc}") from None
        return self


class EvaluateParams(_Params):
    """`brainrank evaluate`: score a trained cascade on one split of a cache, write a report.

    ``split`` is the cache's split label ("test" by default) or "all". ``n_boot``, ``seed`` and
    ``level`` set the bootstrap intervals (``n_boot`` 0: none). ``store_bias`` also stores the
    validation-fitted correction in MODEL_DIR/bias.json for `brainrank predict --bias-correct`.
    ``engine`` "ray" predicts as ``workers`` Ray tasks at a time that read their own rows from
    the cache (``gpu``: on GPU workers, CUDA checked there, so a CPU head can drive them);
    "local" predicts in this process (``workers`` 1). ``model_dir``, ``cache`` and ``out`` are
    paths or file:// URIs on a POSIX file system (rankcore.locations).
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
    allow_incomplete_cache: bool = False
    engine: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, le=256)

    _paths = field_validator("model_dir", "cache", "out")(_posix_path)

    @model_validator(mode="after")
    def _workers_need_ray(self) -> EvaluateParams:
        if self.engine == "local" and self.workers != 1:
            raise ValueError(f"`workers` must be 1 with engine 'local' (it predicts in this "
                             f"process; --engine ray runs N workers), got {self.workers}")
        return self


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
    ``batch_size`` have no CLI option: set them in --config. ``allow_whole_head``: predict
    images that look like whole heads (not skull-stripped) instead of setting them aside
    (``not_skull_stripped``); a model trained with it does so anyway.
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
    allow_whole_head: bool = False

    _paths = field_validator("model_dir", "cohort", "out", "cache", "bias_file")(_posix_path)

    @field_validator("shape")
    @classmethod
    def _positive_predict_shape(cls, v: tuple[int, int, int] | None
                                ) -> tuple[int, int, int] | None:
        return check_shape(v)


# The pipeline's parameters and the job parameters live in their own modules; re-exported
# here so every command's model is found in flows.params.
from flows.params_jobs import JobCommand, ServeParams, SubmitParams  # noqa: E402, F401
from flows.params_pipeline import (  # noqa: E402, F401
    PIPELINE_DERIVED,
    PipelineEvaluate,
    PipelineIngest,
    PipelineParams,
    PipelinePretrain,
    PipelineSimulate,
    PipelineSorter,
    PipelineTrain,
)
