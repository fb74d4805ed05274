"""Pydantic models of the stage commands' parameters (simulate, ingest, pretrain-sorter,
train, evaluate, card, predict): the one definition of every option.

The CLI (flows/cli.py), --config files and the deployments (flows/deployed.py) are derived
from these models: option names, types, defaults, bounds and help (each field's
``description``) are written here once. Paths are strings so that the models serialise to
JSON for Prefect deployments unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


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


#: Descriptions shared by several models (one vocabulary: each means the same everywhere).
COHORT = "BIDS root or manifest (.csv, .tsv, .parquet)"
GRID = "output grid in voxels"
WORKERS = "parallel workers"
RAY_ADDRESS = "join this Ray cluster"
ALLOW_OUTSIDE_ROOT = "accept manifest paths outside the manifest's folder"
INCOMPLETE = ("use a cache whose ingest was interrupted (refused by default; results then "
              "cover only the subjects cached so far)")
MODEL_DIR = "model folder written by `brainrank train`"


class SimulateParams(_Params):
    """`brainrank simulate`: write a simulated BIDS-style cohort.

    With ``anatomy`` each subject's anatomy is deformed by its own smooth random warp of RMS
    ``warp_sd_mm`` mm (rankcore.mri.anatomy); off, every brain is the template's anatomy.
    """

    out_dir: str = Field(description="folder of the simulated cohort")
    subjects: int = Field(200, ge=2, le=100_000, description="number of subjects")
    seed: int = Field(0, description="random seed")
    spacing: float = Field(2.0, ge=1, le=4, description="simulation voxel size, mm")
    sites: int = Field(3, ge=1, le=64, description="number of scanner sites")
    corrupt: int = Field(0, ge=0, description="add this many deliberately broken files")
    workers: int = Field(1, ge=1, le=256, description="processes")
    anatomy: bool = Field(True, description="a per-subject anatomical warp (off: every brain "
                                            "is the template's)")
    warp_sd_mm: float = Field(2.5, ge=0, le=4,
                              description="RMS displacement of the anatomical warp, mm")

    _paths = field_validator("out_dir")(_posix_path)


class IngestParams(_Params):
    """`brainrank ingest`: validate, preprocess and cache a cohort.

    ``batch_size`` changes how the cache is cut into shards, not what it holds.
    """

    cohort: str = Field(description=COHORT)
    cache: str = Field(description="cache folder")
    spacing: float = Field(2.0, gt=0, le=8, description="output voxel size, mm")
    shape: tuple[int, int, int] = Field((80, 96, 80), description=GRID)
    workers: int = Field(1, ge=1, le=256, description=WORKERS)
    engine: Literal["local", "ray"] = Field(
        "local", description="run subjects in local processes or as Ray tasks")
    max_failed_fraction: float = Field(
        0.5, ge=0, le=1, description="exit non-zero when more than this fraction is quarantined")
    allow_outside_root: bool = Field(False, description=ALLOW_OUTSIDE_ROOT)
    require_age: bool = Field(True, description="refuse subjects without an age")
    tissue: bool = Field(True, description="tissue measurement (N4, registration, tissue "
                                           "channels); off: intensity volumes only, e.g. for "
                                           "phantoms")
    allow_whole_head: bool = Field(
        False, description="process images that look like whole heads (not skull-stripped) as "
                           "they are, in a cache of their own, instead of quarantining them as "
                           "not_skull_stripped")
    ray_address: str | None = Field(None, description=f"{RAY_ADDRESS} (engine ray)")
    batch_size: int | None = Field(
        None, ge=1, description="subjects per batch (= per shard, = per retry); default: up to "
                                "64, fewer so that each worker gets a batch")

    _paths = field_validator("cohort", "cache")(_posix_path)

    @field_validator("shape")
    @classmethod
    def _grid_fits(cls, v: tuple[int, int, int], info) -> tuple[int, int, int]:
        from rankcore.mri.grid import check_shape  # scipy: imported on use

        return check_shape(v, info.data.get("spacing"))


class PretrainSorterParams(_Params):
    """`brainrank pretrain-sorter`: train a learned sorter on synthetic sequences.

    ``engine`` "auto" trains in this process with one worker and no ``ray_address``, on Ray
    Train otherwise. ``fail_at_step`` is a test hook (one worker fails once after it).
    """

    out: str = Field(description="output .safetensors file")
    kind: str = Field("pairwise", description="sorter family")
    seq_len: int = Field(32, ge=2, le=4096, description="training sequence length")
    steps: int = Field(2000, ge=1, description="optimisation steps")
    batch_size: int = Field(64, ge=1, description="sequences per step, per worker")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    workers: int = Field(1, ge=1, le=256, description="Ray Train workers")
    gpu: bool = Field(False, description="train on GPU workers")
    seed: int = Field(0, ge=0, description="random seed")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")
    storage_path: str | None = Field(None, description="Ray Train storage (local folder or URI)")
    ray_address: str | None = Field(None, description=RAY_ADDRESS)
    sizes: dict[str, int] = Field(default_factory=dict,
                                  description="network sizes of the sorter family, e.g. "
                                              "hidden_size=64")
    loss: Literal["l1", "mse"] = Field("l1", description="loss against the target ranks")
    target_strength: float = Field(0.05, ge=0, le=10,
                                   description="sigma of the smoothed target ranks (0: exact "
                                               "ranks)")
    eval_every: int = Field(200, ge=1, description="steps between evaluations")
    eval_rows: int = Field(16, ge=1, le=1024, description="sequences per evaluation")
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="train in this process (local), on Ray Train (ray), or local with "
                            "one worker and no Ray address (auto)")
    fail_at_step: int | None = Field(None, ge=1, description="test hook: one worker fails once "
                                                             "after this step")

    _paths = field_validator("out")(_posix_path)  # the sorter file; storage_path takes URIs


class TrainParams(_Params):
    """`brainrank train`: train the two-stage cascade on a cache into a model folder.

    ``rank_loss`` None means "soft" (the default of every command: soft pairwise Spearman at
    TrainConfig's strength and weight); giving ``sorter`` selects "sorter". ``epochs``,
    ``batch_size`` None take the library's CPU sizing (rankcore.train.cascade_plan.
    default_config, which also sets the early-stopping patience). Several caches matching
    ``spacing`` / ``shape`` / ``tissue`` is refused. ``options`` and ``stage2_options`` are
    validated as TrainConfig keys when the parameters are read.
    """

    cache: str = Field(description="cache folder written by `brainrank ingest`")
    out: str = Field(description="model folder to create")
    rank_loss: Literal["sorter", "soft", "none"] | None = Field(
        None, description="rank loss without a sorter: soft ranks or none (default soft; "
                          "--sorter selects 'sorter')")
    sorter: str | None = Field(None, validate_default=True,
                               description="rank loss through this learned sorter "
                                           "(.safetensors file or the name of a shipped sorter)")
    epochs: int | None = Field(None, ge=1, le=10_000,
                               description="epochs of every training job (default: "
                                           "rankcore.train.default_config)")
    batch_size: int | None = Field(None, ge=2, le=4096,
                                   description="global mini-batch, the sequence the rank loss "
                                               "ranks (default: rankcore.train.default_config)")
    workers: int = Field(1, ge=1, le=256,
                         description="local: stage-1 jobs run side by side in this many "
                                     "processes; ray: Ray Train workers per stage")
    gpu: bool = Field(False, description="train on CUDA (bf16)")
    seed: int = Field(0, ge=0, description="random seed")
    k_folds: int = Field(3, ge=2, le=20,
                         description="cross-fitting folds for stage 2's out-of-fold inputs")
    val_fraction: float = Field(0.1, ge=0, le=0.5,
                                description="share of the training participants held out for "
                                            "validation (early stopping, calibration)")
    test_fraction: float = Field(0.2, ge=0, le=0.5,
                                 description="when no cached row is labelled test, hold out "
                                             "this share of the participants as the test split, "
                                             "as `pipeline` does (0: none)")
    split_seed: int = Field(0, ge=0, description="seed of the test hold-out's stable hash")
    engine: Literal["local", "ray"] = Field(
        "local", description="train in this process or on Ray Train")
    storage_path: str | None = Field(None, description="Ray Train storage (engine ray), "
                                                       "outside MODEL_DIR")
    ray_address: str | None = Field(None, description=f"{RAY_ADDRESS} (engine ray)")
    spacing: float | None = Field(None, gt=0, le=8, description="pick the cache of this voxel "
                                                               "size (mm) when it holds several")
    shape: tuple[int, int, int] | None = Field(None, description="pick the cache of this grid "
                                                                 "when it holds several")
    tissue: bool | None = Field(None, description="pick the cache ingested with (--tissue) or "
                                                  "without (--no-tissue) tissue measurement "
                                                  "when it holds both")
    options: dict = Field(default_factory=dict,
                          description="more TrainConfig keys (rankcore/train/config.py), e.g. "
                                      "lr=3e-4, rank_weight=100, soft_strength=0.1, "
                                      "backbone.growth=[8,16]")
    stage2_options: dict = Field(default_factory=dict,
                                 description="TrainConfig keys that differ for stage 2")
    allow_incomplete_cache: bool = Field(False, description=INCOMPLETE)

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
        from rankcore.mri.grid import check_shape  # scipy: imported on use

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

    def train_config(self) -> dict[str, Any]:
        """The stage-1 TrainConfig (as a dict) these parameters ask for, defaults included."""
        from rankcore.train.cascade_plan import default_config

        rank_loss = self.rank_loss or ("sorter" if self.sorter else "soft")
        changes = dict(self.options)
        changes.update(**self.sizing(), seed=self.seed, rank_loss=rank_loss,
                       sorter=self.sorter)
        return default_config(**changes).to_dict()

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
    """`brainrank evaluate`: score a trained cascade on one split of a cache, write a report."""

    model_dir: str = Field(description=MODEL_DIR)
    cache: str = Field(description="cache holding volumes preprocessed as the model expects")
    out: str = Field(description="report folder to write")
    split: str = Field("test", min_length=1,
                       description="split label to evaluate, or 'all' for every cached subject")
    n_boot: int = Field(1000, ge=0, le=100_000,
                        description="bootstrap resamples for the intervals (0: none)")
    seed: int = Field(0, ge=0, description="bootstrap seed")
    level: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    batch_size: int | None = Field(None, ge=1, description="volumes per prediction batch")
    gpu: bool = Field(False, description="predict on CUDA (engine ray: on GPU workers, CUDA "
                                         "checked there, so a CPU head can drive them)")
    store_bias: bool = Field(True, description="store the validation-fitted bias correction "
                                               "in MODEL_DIR/bias.json (for `brainrank predict "
                                               "--bias-correct`)")
    allow_incomplete_cache: bool = Field(False, description=INCOMPLETE)
    engine: Literal["local", "ray"] = Field(
        "local", description="predict in this process, or as Ray tasks that read their own "
                             "rows from the cache")
    workers: int = Field(1, ge=1, le=256, description="Ray tasks at a time (engine ray; 1 "
                                                      "with engine local)")

    _paths = field_validator("model_dir", "cache", "out")(_posix_path)

    @model_validator(mode="after")
    def _workers_need_ray(self) -> EvaluateParams:
        if self.engine == "local" and self.workers != 1:
            raise ValueError(f"`workers` must be 1 with engine 'local' (it predicts in this "
                             f"process; --engine ray runs N workers), got {self.workers}")
        return self


class CardParams(_Params):
    """`brainrank card`: print a model's card."""

    model_dir: str = Field(min_length=1, description=MODEL_DIR)
    as_json: bool = Field(False, description="print the raw card.json")


class PredictParams(_Params):
    """`brainrank predict`: apply a trained cascade to a cohort (an image, a folder of images,
    BIDS or a manifest). ``spacing`` / ``shape``, when given, must be the model's.
    """

    model_dir: str = Field(description=MODEL_DIR)
    cohort: str = Field(description="one image (.nii, .nii.gz, .mgz), a folder of images, "
                                    f"or a {COHORT}; ages optional")
    out: str = Field(description="output table, .csv or .parquet")
    bias_correct: bool = Field(False, description="fill corrected_age/corrected_gap with the "
                                                  "correction stored by `brainrank evaluate` "
                                                  "(MODEL_DIR/bias.json)")
    bias_method: Literal["beheshti", "cole"] = Field("beheshti",
                                                     description="form of the bias correction")
    bias_file: str | None = Field(None, description="bias.json to use instead of "
                                                    "MODEL_DIR/bias.json")
    cache: str | None = Field(None, description="preprocessing cache (default: <output without "
                                                "extension>.cache next to the output)")
    spacing: float | None = Field(None, gt=0, le=8, description="expected voxel size, mm: "
                                                               "refused unless it is the model's")
    shape: tuple[int, int, int] | None = Field(None, description="expected grid: refused unless "
                                                                 "it is the model's")
    workers: int = Field(1, ge=1, le=256, description="preprocessing workers")
    engine: Literal["local", "ray"] = Field(
        "local", description="preprocess in local processes or as Ray tasks")
    allow_outside_root: bool = Field(False, description=ALLOW_OUTSIDE_ROOT)
    batch_size: int | None = Field(None, ge=1, description="volumes per prediction batch")
    gpu: bool = Field(False, description="predict on CUDA")
    max_spacing_ratio: float = Field(2.0, ge=1, description="set aside images whose voxels are "
                                                            "coarser than this many times the "
                                                            "model's")
    max_failed_fraction: float = Field(1.0, ge=0, le=1, description="exit 3 when more than this "
                                                                    "fraction is set aside")
    allow_whole_head: bool = Field(
        False, description="predict images that look like whole heads (not skull-stripped) "
                           "instead of setting them aside as not_skull_stripped (a model "
                           "trained with it does so anyway)")

    _paths = field_validator("model_dir", "cohort", "out", "cache", "bias_file")(_posix_path)

    @field_validator("shape")
    @classmethod
    def _positive_predict_shape(cls, v: tuple[int, int, int] | None
                                ) -> tuple[int, int, int] | None:
        from rankcore.mri.grid import check_shape  # scipy: imported on use

        return check_shape(v)
