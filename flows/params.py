"""Pydantic models of every flow's parameters (the CLI, --config files and deployments share them).

Paths are strings so that the models serialise to JSON for Prefect deployments unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulateParams(_Params):
    """`brainrank simulate`: write a simulated BIDS-style cohort."""

    out_dir: str
    subjects: int = Field(200, ge=2, le=100_000)
    seed: int = 0
    spacing: float = Field(2.0, gt=0, le=8)
    sites: int = Field(3, ge=1, le=64)
    corrupt: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, le=256)


class IngestParams(_Params):
    """`brainrank ingest`: validate, preprocess and cache a cohort."""

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
    ``target_strength``, ``eval_every`` and ``engine`` have no CLI option: set them in
    --config. ``fail_at_step`` is a test hook (one worker fails once after that step).
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
    engine: Literal["auto", "local", "ray"] = "auto"
    fail_at_step: int | None = Field(None, ge=1)
