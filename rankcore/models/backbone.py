"""ScaleDense-style 3-D backbone and the stage-1 age regressor built on it.

The design follows the ScaleDense network of Cheng et al. (IEEE TMI 2021): a stem convolution,
then blocks of asymmetric convolutions -> BN -> ELU -> squeeze-and-excitation -> pooling, each
concatenating its pooled input with its new features, then global pooling and a small head; sex
enters through a small fully connected branch. The defaults are sized for CPU training on 2 mm
volumes of shape (80, 96, 80): the input is first average-pooled by 2 (4 mm) and the stem is
strided (8 mm), which together cut the voxel count by 64 before the first dense block. Measured
on a shared 2-core CPU at batch 16, one thread: ~30-50 samples/s forward + backward (the
reference's widths reach ~100 M parameters per stage).

Age is predicted in standardised units and un-standardised inside the model:
``age = age_mean + age_std * head(features)``. ``age_mean`` and ``age_std`` are buffers (saved
with the weights) that the training loop sets from the training ages with
:meth:`AgeRegressor.set_age_scale`; this plays the role of initialising the output bias to the
mean training age while keeping the head's outputs of order one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankcore.errors import InputError, ShapeError
from rankcore.models.blocks import DenseBlock

__all__ = ["AgeRegressor", "AgeScaleMixin", "BackboneConfig", "ScaleDense", "SexBranch",
           "check_image",
           "count_parameters"]


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of the backbone and its regression head (validated on construction).

    Attributes:
        input_pool: average-pooling factor applied to the input first (1 = none; 2 turns a
            2 mm volume into 4 mm, which is the main CPU saving).
        stem_channels: output channels of the stem convolution.
        stem_kernel: cubic kernel size of the stem (odd).
        stem_stride: stride of the stem.
        growth: new channels added by each dense block; its length is the number of blocks
            (each block halves the grid with a max-pool).
        se_reduction: channel reduction inside squeeze-and-excitation.
        sex_features: width of the sex branch (0 disables sex as an input).
        head_hidden: hidden width of the regression head.
        dropout: dropout before the head (0 disables).

    The defaults give 109,103 parameters for the stage-1 regressor (:class:`AgeRegressor`).
    """

    input_pool: int = 2
    stem_channels: int = 8
    stem_kernel: int = 5
    stem_stride: int = 2
    growth: tuple[int, ...] = (8, 16, 24, 32)
    se_reduction: int = 4
    sex_features: int = 8
    head_hidden: int = 32
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_int(self.input_pool, "input_pool", 1)
        _check_int(self.stem_channels, "stem_channels", 1)
        _check_int(self.stem_kernel, "stem_kernel", 1)
        if self.stem_kernel % 2 == 0:
            raise InputError(f"`stem_kernel` must be odd, got {self.stem_kernel}")
        _check_int(self.stem_stride, "stem_stride", 1)
        growth = self.growth
        if isinstance(growth, int | str) or not hasattr(growth, "__iter__"):
            raise InputError(f"`growth` must be a sequence of positive integers, got {growth!r}")
        growth = tuple(growth)
        if not growth:
            raise InputError("`growth` must hold at least one block width, got ()")
        for g in growth:
            _check_int(g, "growth", 1)
        object.__setattr__(self, "growth", growth)
        _check_int(self.se_reduction, "se_reduction", 1)
        _check_int(self.sex_features, "sex_features", 0)
        _check_int(self.head_hidden, "head_hidden", 1)
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise InputError(f"`dropout` must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``growth`` as a list); :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["growth"] = list(self.growth)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackboneConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused."""
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"`backbone` has unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "growth" in d and isinstance(d["growth"], list):
            d["growth"] = tuple(d["growth"])
        return cls(**d)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """Raise ShapeError unless ``image`` is a float (B, 1, X, Y, Z) tensor."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"`{name}` must be a tensor, got {type(image).__name__}")
    if image.ndim != 5 or image.shape[1] != 1:
        raise ShapeError(f"`{name}` must have shape (B, 1, X, Y, Z), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise InputError(f"`{name}` must be a floating tensor, got dtype {image.dtype}")


class ScaleDense(nn.Module):
    """The feature extractor: input pooling -> stem -> dense blocks -> global average pool.

    Args:
        config: sizes (see :class:`BackboneConfig`).

    Shapes:
        input (B, 1, X, Y, Z) float -> output (B, ``out_features``).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        p = config.input_pool
        self.input_pool = nn.AvgPool3d(p, ceil_mode=True) if p > 1 else nn.Identity()
        self.stem = nn.Conv3d(1, config.stem_channels, config.stem_kernel,
                              stride=config.stem_stride, padding=config.stem_kernel // 2,
                              bias=False)
        self.stem_bn = nn.BatchNorm3d(config.stem_channels)
        blocks = []
        channels = config.stem_channels
        for g in config.growth:
            block = DenseBlock(channels, g, config.se_reduction)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_features = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.input_pool(image)
        x = F.elu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return x.mean(dim=(2, 3, 4))


class SexBranch(nn.Module):
    """Small FC branch for sex, coded +1 (male), -1 (female), 0 (unknown): (B,) -> (B, width)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(1, width)

    def forward(self, sex: torch.Tensor) -> torch.Tensor:
        return F.elu(self.fc(sex.to(self.fc.weight.dtype)[:, None]))


class AgeScaleMixin:
    """Adds :meth:`set_age_scale` to a module with ``age_mean`` / ``age_std`` buffers."""

    age_mean: torch.Tensor
    age_std: torch.Tensor

    def set_age_scale(self, mean: float, std: float) -> None:
        """Set the years <-> standardised-units map (mean and sd of the training ages)."""
        mean, std = float(mean), float(std)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise InputError(f"age scale must be a finite mean and a positive sd, got "
                             f"mean={mean!r}, std={std!r}")
        self.age_mean.fill_(mean)
        self.age_std.fill_(std)


class AgeRegressor(AgeScaleMixin, nn.Module):
    """Stage 1 of the cascade: image (+ sex) -> age in years.

    Args:
        config: backbone and head sizes. With the defaults this module has 109,103 parameters.

    Buffers:
        age_mean, age_std: the affine map from the head's standardised output to years
            (set from the training ages with :meth:`set_age_scale`; defaults 50 and 20).

    Shapes:
        forward(image (B, 1, X, Y, Z), sex (B,) or None) -> age (B,) in years. ``sex`` uses
        +1 male, -1 female, 0 unknown; None means unknown for every subject.
    """

    def __init__(self, config: BackboneConfig | None = None):
        super().__init__()
        self.config = config or BackboneConfig()
        self.backbone = ScaleDense(self.config)
        n_sex = self.config.sex_features
        self.sex_branch = SexBranch(n_sex) if n_sex > 0 else None
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Sequential(
            nn.Linear(self.backbone.out_features + n_sex, self.config.head_hidden),
            nn.ELU(),
            nn.Linear(self.config.head_hidden, 1),
        )
        self.register_buffer("age_mean", torch.tensor(50.0))
        self.register_buffer("age_std", torch.tensor(20.0))

    def features(self, image: torch.Tensor, sex: torch.Tensor | None) -> torch.Tensor:
        """Image features concatenated with the sex branch: (B, out_features + sex_features)."""
        check_image(image)
        feats = self.backbone(image)
        if self.sex_branch is not None:
            if sex is None:
                sex = torch.zeros(image.shape[0], device=image.device)
            elif sex.shape != (image.shape[0],):
                raise ShapeError(f"`sex` must have shape ({image.shape[0]},), got "
                                 f"{tuple(sex.shape)}")
            feats = torch.cat([feats, self.sex_branch(sex).to(feats.dtype)], dim=1)
        return self.dropout(feats)

    def forward(self, image: torch.Tensor, sex: torch.Tensor | None = None) -> torch.Tensor:
        z = self.head(self.features(image, sex))[:, 0]
        return self.age_mean + self.age_std * z
