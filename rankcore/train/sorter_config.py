"""Configuration of sorter pretraining: one frozen dataclass, validated, rebuilt from a dict.

A Ray Train worker receives ``SorterTrainConfig.to_dict()`` and rebuilds it with
:meth:`SorterTrainConfig.from_dict`, so the same checks run in the driver and on every worker.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from rankcore.errors import InputError

__all__ = ["DEVICES", "LOSSES", "LR_SCHEDULES", "SorterTrainConfig"]

LOSSES = ("l1", "mse")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
#: Fields that do not change what is learned (left out of :meth:`SorterTrainConfig.digest`).
RUNTIME_FIELDS = ("device", "fail_at_step", "fail_marker", "eval_every", "checkpoint_every")


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _num(value: Any, name: str, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "a positive number" if positive else "a finite number >= 0"
        raise InputError(f"`{name}` must be {kind}, got {value!r}")
    return float(value)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _lengths(value: Any, name: str) -> tuple[int, ...]:
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        lens = tuple(items)
    except TypeError:
        raise InputError(f"`{name}` must be a length or a list of lengths >= 2, "
                         f"got {value!r}") from None
    if not lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lens):
        raise InputError(f"`{name}` must be a length or a non-empty list of lengths >= 2, "
                         f"got {value!r}")
    return lens


@dataclass(frozen=True)
class SorterTrainConfig:
    """Everything a sorter pretraining run needs (validated on construction).

    Attributes:
        kind: sorter family (see ``rankcore.sorters.SORTER_KINDS``).
        seq_len: training length N, or several (a length is drawn per batch; length-agnostic
            kinds only). Stored as a tuple.
        sizes: size arguments of the family (``rankcore.sorters.sorter_sizes(kind)``).
        steps: optimisation steps (each worker draws one batch per step).
        batch_size: sequences per worker per step (the global batch is ``workers`` times it).
        lr: peak Adam learning rate.
        lr_schedule: ``"cosine"`` (decay to ``lr_floor``·lr at the last step) or ``"constant"``.
        lr_floor: final learning rate as a fraction of ``lr`` (cosine only).
        loss: ``"l1"`` (SoDeep's choice) or ``"mse"`` against the targets.
        target_strength: σ ≥ 0 of the smoothed targets, in standard deviations of the
            sequence: the target of element i is its expected SoDeep rank when every value
            gets independent N(0, σ²) noise (σ = 0: the exact tie-aware ranks). It caps how
            sharp the learned step can get, so the sorter keeps a useful gradient (see
            :func:`rankcore.train.sorter.smoothed_target`).
        grad_clip: max gradient norm (0 disables clipping).
        seed: seed of the training streams and of the initial weights.
        eval_every: steps between validation passes (rank error and Spearman at the
            training lengths).
        checkpoint_every: steps between checkpoints (and Ray Train reports).
        eval_rows: rows per validation cell.
        eval_lengths: lengths of the final validation (with gradient agreement); empty: the
            training lengths, plus 8 and 128 for length-agnostic kinds.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        fail_at_step: test hook: the last worker raises once after this step (needs
            ``fail_marker``, a file path or URI that records that the failure happened).
        fail_marker: see ``fail_at_step``.
    """

    kind: str = "pairwise"
    seq_len: tuple[int, ...] = (32,)
    sizes: dict[str, int] = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_floor: float = 0.05
    loss: str = "l1"
    target_strength: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    checkpoint_every: int = 200
    eval_rows: int = 16
    eval_lengths: tuple[int, ...] = ()
    device: str = "auto"
    fail_at_step: int | None = None
    fail_marker: str | None = None

    def __post_init__(self) -> None:
        from rankcore.sorters import SORTER_KINDS, sorter_sizes

        _choice(self.kind, "kind", SORTER_KINDS)
        lens = _lengths(self.seq_len, "seq_len")
        object.__setattr__(self, "seq_len", lens)
        if self.kind == "lstm" and len(lens) != 1:
            raise InputError(f"`seq_len` must be one length for an 'lstm' sorter (it works at "
                             f"one length only), got {list(lens)}")
        if not isinstance(self.sizes, dict):
            raise InputError(f"`sizes` must be a mapping of size names to integers, got "
                             f"{self.sizes!r}")
        allowed = sorter_sizes(self.kind)
        unknown = sorted(set(self.sizes) - set(allowed))
        if unknown:
            raise InputError(f"`sizes` of a {self.kind!r} sorter must be among "
                             f"{', '.join(allowed)}, got unknown {', '.join(unknown)}")
        for name, value in self.sizes.items():
            _int(value, f"sizes.{name}", 1)
        _int(self.steps, "steps", 1)
        _int(self.batch_size, "batch_size", 1)
        _num(self.lr, "lr", positive=True)
        _choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        _num(self.lr_floor, "lr_floor", positive=False)
        if self.lr_floor > 1:
            raise InputError(f"`lr_floor` must be in [0, 1], got {self.lr_floor!r}")
        _choice(self.loss, "loss", LOSSES)
        _num(self.target_strength, "target_strength", positive=False)
        _num(self.grad_clip, "grad_clip", positive=False)
        _int(self.seed, "seed", 0)
        _int(self.eval_every, "eval_every", 1)
        _int(self.checkpoint_every, "checkpoint_every", 1)
        _int(self.eval_rows, "eval_rows", 1)
        object.__setattr__(self, "eval_lengths",
                           () if not self.eval_lengths else _lengths(self.eval_lengths,
                                                                     "eval_lengths"))
        if self.kind == "lstm" and any(n != lens[0] for n in self.eval_lengths):
            raise InputError(f"`eval_lengths` of an 'lstm' sorter must be its seq_len "
                             f"{lens[0]}, got {list(self.eval_lengths)}")
        _choice(self.device, "device", DEVICES)
        if self.fail_at_step is not None:
            _int(self.fail_at_step, "fail_at_step", 1)
            if not self.fail_marker:
                raise InputError("`fail_marker` must name a file when `fail_at_step` is set, "
                                 "got None")

    @property
    def fixed_length(self) -> int | None:
        """The sorter's build length for ``lstm`` (its one seq_len), else None."""
        return self.seq_len[0] if self.kind == "lstm" else None

    @property
    def validation_lengths(self) -> tuple[int, ...]:
        """Lengths of the final validation (see ``eval_lengths``)."""
        if self.eval_lengths:
            return self.eval_lengths
        if self.kind == "lstm":
            return self.seq_len
        return tuple(sorted({*self.seq_len, 8, 128}))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (lists for tuples)."""
        d = asdict(self)
        d["seq_len"] = list(self.seq_len)
        d["eval_lengths"] = list(self.eval_lengths)
        d["sizes"] = dict(self.sizes)
        return d

    @classmethod
    def from_dict(cls, data: SorterTrainConfig | dict[str, Any]) -> SorterTrainConfig:
        """Rebuild (and validate) a config from :meth:`to_dict`'s output or a partial dict."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise InputError(f"`config` must be a SorterTrainConfig or a dict, got "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"`config` has unknown key(s) {', '.join(unknown)}")
        values = dict(data)
        for key in ("seq_len", "eval_lengths"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> SorterTrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def digest(self) -> str:
        """SHA-256 of the fields that shape the result (not device, hooks or report cadence)."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
