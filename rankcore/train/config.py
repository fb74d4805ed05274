"""Training configuration: one frozen dataclass, validated on construction, rebuilt from a dict.

A Ray Train worker receives the config as a plain dict (``TrainConfig.to_dict()``) and rebuilds
it with :meth:`TrainConfig.from_dict`, so the same validation runs on every worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from rankcore.errors import InputError
from rankcore.models.backbone import BackboneConfig
from rankcore.models.cascade import CascadeConfig

__all__ = ["DEFAULT_RANK_WEIGHT", "LR_SCHEDULES", "MODELS", "OBJECTIVE_PRESETS", "OPTIMIZERS",
           "RANK_LOSSES", "TrainConfig"]

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("cosine", "plateau", "none")
RANK_LOSSES = ("sorter", "soft", "none")
DEVICES = ("auto", "cpu", "cuda")
#: What a stage-1 model's prediction is made of (see :class:`TrainConfig`).
MODELS = ("prior", "network", "both")

#: w_rank of the default objective, chosen so that the default surrogate (soft pairwise
#: Spearman, strength 0.05) carries about a tenth of the summed gradient norms next to the MSE
#: on a batch of 16 with prediction errors of SD 6 y (benchmarks/bench_shares.py measures it).
#: The share grows as the errors shrink; ``rank_share`` holds it at a target instead.
DEFAULT_RANK_WEIGHT = 250.0

#: The weights each objective preset gives ``rank_weight`` and ``diff_weight`` when they are
#: left unset (None). "reference" is Cheng et al.'s MSE + λ(S + β·Ld) with λ = 10, β = 1.
OBJECTIVE_PRESETS: dict[str, dict[str, float]] = {
    "default": {"rank_weight": DEFAULT_RANK_WEIGHT, "diff_weight": 0.0},
    "reference": {"rank_weight": 10.0, "diff_weight": 10.0},
}


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _num(value: Any, name: str, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "a positive number" if positive else "a finite number >= 0"
        raise InputError(f"`{name}` must be {kind}, got {value!r}")
    return float(value)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"`{name}` must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training stage needs besides the data (validated on construction).

    Attributes:
        model: what the prediction is made of. ``"both"`` (default): the closed-form prior
            (rankcore.train.prior) plus a network that learns a residual on top of it;
            ``"prior"``: the closed-form prior alone (no optimiser step is taken);
            ``"network"``: the network alone (no prior is fitted). For stage 2, ``"prior"``
            means no correction (the cascade's output is stage 1's) and the other two train
            stage 2. With validation data, the starting point (the prior alone: the
            network's residual zeroed) is scored as epoch -1, and early stopping keeps it
            unless a training epoch beats it.
        epochs: maximum number of epochs.
        batch_size: GLOBAL mini-batch size: the ranking terms rank this many predictions as one
            sequence; with W workers each takes ``batch_size / W`` (must divide evenly). Every
            training batch is full (the incomplete last batch of an epoch is dropped: a batch of
            one has nothing to rank, and fixed-length sorters need exactly ``seq_len`` values).
        lr: initial learning rate.
        weight_decay: ``"adam"``: L2 penalty added to the gradient (the reference's Adam);
            ``"adamw"``: decoupled weight decay.
        optimizer: ``"adam"`` (Adam with amsgrad, as the reference) or ``"adamw"``.
        lr_schedule: ``"cosine"`` (default): lr_e = lr · (1 + cos(π e / epochs)) / 2 at epoch e,
            a fixed decay that suits short CPU budgets; ``"plateau"``: multiply the lr by
            ``plateau_factor`` after ``plateau_patience`` epochs without a better validation
            MAE (the reference: 0.5 after 5); ``"none"``: constant.
        plateau_factor, plateau_patience: see ``lr_schedule``.
        early_stopping: stop after this many epochs without a better validation MAE (None:
            never; the reference uses 20). Ignored without validation data. Epoch -1 (the
            starting point) counts: an epoch must beat it to be kept.
        objective_preset: ``"default"`` or ``"reference"``; the objective is
            regression + w_rank · S + w_diff · Ld (:class:`rankcore.losses.BrainAgeLoss`), and
            the preset gives the weights left unset (:data:`OBJECTIVE_PRESETS`). "default":
            w_rank = :data:`DEFAULT_RANK_WEIGHT`, w_diff = 0 (Ld's gradient is nearly parallel
            to the MSE's). "reference": Cheng et al.'s MSE + λ(S + β·Ld), λ = 10, β = 1
            (w_rank = 10, w_diff = 10) for reproduction; it needs ``regression="mse"`` and
            leaves ``rank_weight``, ``diff_weight`` and ``rank_share`` unset.
        regression: ``"mse"`` or ``"l1"`` (the regression part of BrainAgeLoss).
        rank_loss: ``"soft"`` (training-free soft ranks, default), ``"sorter"`` (a learned
            SoDeep sorter: ``sorter`` names a file or a shipped sorter) or ``"none"``.
        sorter: path of a sorter ``.safetensors`` file, or the name of a shipped sorter.
        soft_method: ``"pairwise"`` (default) or ``"pav"`` (see rankcore.soft).
        soft_strength: soft-rank strength, in standard deviations of the batch's predictions.
            For ``"pav"`` keep it below ~2·range/N (≈ 0.45 SD at N = 16): above it the PAV soft
            rank pools the whole batch into one block and soft Spearman degenerates to Pearson.
        rank_weight: w_rank, the weight of the Spearman surrogate S; None: the preset's value,
            or the calibrated one when ``rank_share`` is set (then it must be None).
        diff_weight: w_diff, the weight of the age-difference loss Ld (years²); None: the
            preset's value.
        rank_share: target share in [0, 1) of the Spearman term in the gradient w.r.t. the
            predictions (share of the summed gradient norms, :mod:`rankcore.train.shares`).
            When set, w_rank is calibrated ONCE before the first epoch on the initial model's
            predictions (:func:`rankcore.train.shares.calibrate_rank_weight`) and then held
            fixed, so the objective stays one function across epochs and resumption; the
            resolved weight is recorded in the card and in every epoch's metrics, and the
            logged shares show how the share drifts as training goes on.
        l1_weight: L1 term added inside the Spearman surrogate (SoDeep's advice).
        flip: left-right flip augmentation (each training image flipped along the RAS x axis
            with probability 1/2).
        site_input: give the model the acquisition site (a one-hot input to the head; the
            sites are those of the training data, recorded in ``backbone.sites``) when the
            training data come from at least two known sites. Subjects of other sites are
            predicted with the average site code.
        site_prior: with site input, give each site its own histogram prior, blended with the
            pooled one by leave-one-out error (:func:`rankcore.train.prior.fit_site_priors`);
            False keeps one pooled prior with a per-site intercept.
        flip_tta: average the predictions on the image and its left-right mirror at
            validation and prediction time.
        seed: seeds model initialisation, shuffling, flips and dropout.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: bf16 autocast on CUDA (ignored on CPU, where bf16 convolutions are not faster).
        num_threads: torch intra-op threads during training (None: leave as is). On a shared
            2-core machine 1 thread was measured faster than 2 (thread spin under contention).
        channels_last: use ``torch.channels_last_3d`` (measured slower on CPU, where
            batch norm and pooling fall back to slow paths; try it on CUDA).
        deterministic: on CUDA, ``torch.use_deterministic_algorithms`` (warn only) during
            training; on CPU runs are deterministic for a seed and a thread count anyway.
        eval_batch_size: batch size for validation and prediction (memory only).
        bn_refresh: before each epoch's validation, recompute the batch-norm running
            statistics from this many training subjects with the current weights
            (:func:`rankcore.train.bn_refresh.refresh_batch_norm`; 64 by default); 0 keeps
            the running averages of training.
        backbone: sizes of the network (:class:`rankcore.models.BackboneConfig`).
        cascade: stage-2 settings (:class:`rankcore.models.CascadeConfig`).
    """

    model: str = "both"
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 5e-4
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    early_stopping: int | None = 20
    objective_preset: str = "default"
    regression: str = "mse"
    rank_loss: str = "soft"
    sorter: str | None = None
    soft_method: str = "pairwise"
    soft_strength: float = 0.05
    rank_weight: float | None = None
    diff_weight: float | None = None
    rank_share: float | None = None
    l1_weight: float = 0.0
    flip: bool = True
    flip_tta: bool = False
    site_input: bool = True
    site_prior: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_threads: int | None = None
    channels_last: bool = False
    deterministic: bool = True
    eval_batch_size: int = 32
    bn_refresh: int = 64
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def __post_init__(self) -> None:
        _choice(self.model, "model", MODELS)
        _int(self.epochs, "epochs", 1)
        _int(self.batch_size, "batch_size", 2)
        _num(self.lr, "lr", positive=True)
        _num(self.weight_decay, "weight_decay")
        _choice(self.optimizer, "optimizer", OPTIMIZERS)
        _choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        if not 0 < _num(self.plateau_factor, "plateau_factor", positive=True) < 1:
            raise InputError(f"`plateau_factor` must be in (0, 1), got {self.plateau_factor!r}")
        _int(self.plateau_patience, "plateau_patience", 0)
        if self.early_stopping is not None:
            _int(self.early_stopping, "early_stopping", 1)
        _choice(self.regression, "regression", ("mse", "l1"))
        _choice(self.rank_loss, "rank_loss", RANK_LOSSES)
        if self.rank_loss == "sorter":
            if not isinstance(self.sorter, str) or not self.sorter:
                raise InputError("`sorter` must name a sorter file or a shipped sorter when "
                                 f"rank_loss='sorter', got {self.sorter!r}")
        elif self.sorter is not None:
            raise InputError(f"`sorter` is only used with rank_loss='sorter', got "
                             f"rank_loss={self.rank_loss!r} and sorter={self.sorter!r}")
        _choice(self.soft_method, "soft_method", ("pav", "pairwise"))
        _num(self.soft_strength, "soft_strength", positive=True)
        self._check_objective()
        _num(self.l1_weight, "l1_weight")
        for name in ("flip", "flip_tta", "site_input", "site_prior", "amp", "channels_last",
                     "deterministic"):
            _bool(getattr(self, name), name)
        _int(self.seed, "seed", 0)
        _choice(self.device, "device", DEVICES)
        if self.num_threads is not None:
            _int(self.num_threads, "num_threads", 1)
        _int(self.bn_refresh, "bn_refresh", 0)
        _int(self.eval_batch_size, "eval_batch_size", 1)
        if not isinstance(self.backbone, BackboneConfig):
            raise InputError(f"`backbone` must be a BackboneConfig, got "
                             f"{type(self.backbone).__name__}")
        if not isinstance(self.cascade, CascadeConfig):
            raise InputError(f"`cascade` must be a CascadeConfig, got "
                             f"{type(self.cascade).__name__}")

    def _check_objective(self) -> None:
        preset = _choice(self.objective_preset, "objective_preset", tuple(OBJECTIVE_PRESETS))
        for name in ("rank_weight", "diff_weight"):
            value = getattr(self, name)
            if value is not None:
                _num(value, name)
                if preset == "reference":
                    raise InputError(f"`{name}` must be None with objective_preset "
                                     f"'reference' (it fixes λ = 10, β = 1), got {value!r}")
        if preset == "reference" and self.regression != "mse":
            raise InputError(f"`regression` must be 'mse' with objective_preset 'reference', "
                             f"got {self.regression!r}")
        if self.rank_share is None:
            return
        share = _num(self.rank_share, "rank_share")
        if share >= 1:
            raise InputError(f"`rank_share` must be in [0, 1), got {self.rank_share!r}")
        if self.rank_weight is not None:
            raise InputError(f"`rank_weight` must be None when `rank_share` is set (the weight "
                             f"is calibrated), got {self.rank_weight!r}")
        if self.rank_loss == "none":
            raise InputError("`rank_share` must be None with rank_loss='none' (there is no "
                             f"Spearman term), got {self.rank_share!r}")
        if preset != "default":
            raise InputError(f"`rank_share` must be None with objective_preset {preset!r}, "
                             f"got {self.rank_share!r}")

    def objective_weights(self) -> tuple[float | None, float]:
        """``(w_rank, w_diff)`` with the preset's values filled in; w_rank is None when it is
        calibrated from ``rank_share`` at the start of training (0.0 with rank_loss 'none')."""
        preset = OBJECTIVE_PRESETS[self.objective_preset]
        diff = preset["diff_weight"] if self.diff_weight is None else float(self.diff_weight)
        if self.rank_loss == "none":
            return 0.0, diff
        if self.rank_share is not None:
            return None, diff
        rank = preset["rank_weight"] if self.rank_weight is None else float(self.rank_weight)
        return rank, diff

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; :meth:`from_dict` inverts it exactly."""
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["cascade"] = self.cascade.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | TrainConfig | None) -> TrainConfig:
        """Build from a (possibly partial) plain dict; missing keys take their defaults.

        Raises:
            InputError: unknown keys or invalid values (the message names the key).
        """
        if isinstance(d, TrainConfig):
            return d
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise InputError(f"`config` must be a TrainConfig or a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"`config` has unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if not isinstance(d.get("backbone"), BackboneConfig):
            d["backbone"] = BackboneConfig.from_dict(d.get("backbone"))
        if not isinstance(d.get("cascade"), CascadeConfig):
            d["cascade"] = CascadeConfig.from_dict(d.get("cascade"))
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
