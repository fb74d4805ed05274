"""ScaleDense-style 3-D backbone and the stage-1 age regressor built on it.

The design follows the ScaleDense network of Cheng et al. (IEEE TMI 2021): a stem convolution,
then blocks of asymmetric convolutions -> norm -> ELU -> squeeze-and-excitation -> pooling,
each concatenating its pooled input with its new features, then global pooling and a small head;
sex enters through a small fully connected branch. The defaults are sized for CPU training on
2 mm volumes of shape (80, 96, 80): the input is first average-pooled by 2 (4 mm) and the stem
is strided (8 mm), which together cut the voxel count by 64 before the first dense block.
Measured on a shared 2-core CPU at batch 16, one thread: ~60-90 samples/s forward + backward
(the reference's widths reach ~100 M parameters per stage).

Three additions to the reference design, all measured on simulated cohorts
(benchmarks/bench_accuracy.py; the CNN alone reached test SRCC ~0.77 there, overfitting 300
subjects with spatial detail while missing the global grey-matter signal):

- a parameter-free local contrast normalisation of the pooled input (window 7 voxels = 28 mm at
  4 mm), which cancels the smooth bias field and the site's gain and offset;
- an intensity-histogram branch (24 bins), concatenated with the CNN features, plus a linear
  prior on it fitted in closed form before training (:mod:`rankcore.train.prior`); the network
  then learns what the prior misses. The branch reads the 2 mm input, not the CNN's 4 mm copy,
  with its own local normalisation (13 voxels = 26 mm): on simulated cohorts its ridge prior
  alone went from MAE 5.07 / 6.30 / 6.27 y (4 mm) to 4.69 / 5.78 / 4.85 y (2 mm) over three
  seeds; a 3 x 3 x 3 smoothing first or an 11-voxel window did worse. Being gradient-free
  and unchanged by a left-right flip, its counts are computed once per subject in training
  (:class:`rankcore.train.data.SubjectData`), so the 2 mm pass (~0.1 s per subject on one
  core) is paid once, not every epoch;
- the acquisition site as an optional one-hot input (``sites``), because the sites' tissue
  contrasts differ by as much as forty years of grey-matter loss do;

and group norm instead of batch norm by default (batch norm's running statistics made the
validation MAE jump between epochs; see :func:`~rankcore.models.blocks.make_norm`).

Age is predicted in standardised units and un-standardised inside the model:
``age = age_mean + age_std * (head(features) + prior(histogram, site))``. ``age_mean`` and
``age_std`` are buffers (saved with the weights) that the training loop sets from the training
ages with :meth:`AgeRegressor.set_age_scale`; this plays the role of initialising the output
bias to the mean training age while keeping the head's outputs of order one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankcore.errors import InputError, ShapeError
from rankcore.models.blocks import (
    NORMS,
    DenseBlock,
    IntensityHistogram,
    LocalContrastNorm,
    make_norm,
)

__all__ = ["AgeRegressor", "AgeScaleMixin", "BackboneConfig", "ScaleDense", "SexBranch",
           "SiteInputMixin",
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
        norm: ``"batch"`` (the reference) or ``"group"`` normalisation after each convolution
            (:func:`~rankcore.models.blocks.make_norm`).
        local_norm: window (voxels of the pooled input grid, odd) of the parameter-free local
            contrast normalisation applied after the input pooling
            (:class:`~rankcore.models.blocks.LocalContrastNorm`); 0 disables it.
        hist_bins: bins of the intensity-histogram branch
            (:class:`~rankcore.models.blocks.IntensityHistogram`), concatenated with the CNN
            features; 0 disables it.
        hist_pool: average-pooling factor of the histogram branch's own copy of the input
            (default 1: the histogram sees the full 2 mm grid, whose tissue contrast is
            sharper than at the CNN's 4 mm; it is gradient-free and cached per subject during
            training, so the cost is paid once).
        hist_window: window (voxels of the histogram branch's grid, odd) of its local
            contrast normalisation (default 13 = 26 mm at 2 mm); 0 disables it.
        sites: the acquisition sites the model knows, as a one-hot input to the head (set by
            the training loop from the training data; empty = no site input). A subject from
            another or an unknown site gets the average of the known sites' codes.

    The defaults give 109,871 parameters for the stage-1 regressor (:class:`AgeRegressor`),
    plus 32 per site it is given (the site one-hot enters the head).
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
    norm: str = "group"
    local_norm: int = 7
    hist_bins: int = 24
    hist_pool: int = 1
    hist_window: int = 13
    sites: tuple[str, ...] = ()

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
        if self.norm not in NORMS:
            raise InputError(f"`norm` must be one of {NORMS}, got {self.norm!r}")
        _check_int(self.local_norm, "local_norm", 0)
        if self.local_norm and (self.local_norm < 3 or self.local_norm % 2 == 0):
            raise InputError(f"`local_norm` must be 0 or an odd integer >= 3, got "
                             f"{self.local_norm}")
        _check_int(self.hist_bins, "hist_bins", 0)
        if self.hist_bins == 1:
            raise InputError("`hist_bins` must be 0 or an integer >= 2, got 1")
        _check_int(self.hist_pool, "hist_pool", 1)
        _check_int(self.hist_window, "hist_window", 0)
        if self.hist_window and (self.hist_window < 3 or self.hist_window % 2 == 0):
            raise InputError(f"`hist_window` must be 0 or an odd integer >= 3, got "
                             f"{self.hist_window}")
        sites = self.sites
        if isinstance(sites, str) or not hasattr(sites, "__iter__") \
                or not all(isinstance(x, str) and x for x in sites):
            raise InputError(f"`sites` must be a sequence of site names, got {sites!r}")
        sites = tuple(sites)
        if len(set(sites)) != len(sites):
            raise InputError(f"`sites` must not repeat a name, got {sites!r}")
        object.__setattr__(self, "sites", sites)
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise InputError(f"`dropout` must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``growth`` as a list); :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["growth"] = list(self.growth)
        d["sites"] = list(self.sites)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackboneConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused.

        A config saved before ``hist_pool``/``hist_window`` existed (its histogram branch read
        the CNN's pooled, normalised input) gets ``input_pool``/``local_norm`` for them, so an
        older model keeps computing what it was trained on.
        """
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"`backbone` has unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "hist_bins" in d and "hist_pool" not in d and "hist_window" not in d:
            d["hist_pool"] = d.get("input_pool", cls.input_pool)
            d["hist_window"] = d.get("local_norm", cls.local_norm)
        for key in ("growth", "sites"):
            if key in d and isinstance(d[key], list):
                d[key] = tuple(d[key])
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
        self.local_norm = (LocalContrastNorm(config.local_norm) if config.local_norm
                           else nn.Identity())
        self.stem = nn.Conv3d(1, config.stem_channels, config.stem_kernel,
                              stride=config.stem_stride, padding=config.stem_kernel // 2,
                              bias=False)
        self.stem_bn = make_norm(config.norm, config.stem_channels)
        blocks = []
        channels = config.stem_channels
        for g in config.growth:
            block = DenseBlock(channels, g, config.se_reduction, config.norm)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.histogram = IntensityHistogram(config.hist_bins) if config.hist_bins else None
        # The histogram reads the CNN's input when both see the same grid and normalisation.
        self._hist_shares_input = (config.hist_pool == p
                                   and config.hist_window == config.local_norm)
        hp = config.hist_pool
        self.hist_pool = nn.AvgPool3d(hp, ceil_mode=True) if hp > 1 else nn.Identity()
        self.hist_norm = (LocalContrastNorm(config.hist_window) if config.hist_window
                          else nn.Identity())
        self.out_features = channels + config.hist_bins

    def histogram_key(self) -> tuple[Any, ...]:
        """What the histogram counts of an image depend on (a cache key for them)."""
        h = self.histogram
        return (self.config.hist_pool, self.config.hist_window,
                None if h is None else (h.bins, h.low, h.high))

    @torch.no_grad()
    def histogram_counts(self, image: torch.Tensor) -> torch.Tensor:
        """Unstandardised histogram-branch counts (B, hist_bins) of ``image`` (no gradient).

        They do not change under a left-right flip of the image (the normalisation window is
        symmetric and a histogram ignores positions), so training caches them per subject.
        """
        if self.histogram is None:
            raise InputError("this backbone has no histogram branch (hist_bins = 0)")
        return self.histogram.counts(self.hist_norm(self.hist_pool(image)))

    def forward(self, image: torch.Tensor, hist_counts: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Features (B, out_features); ``hist_counts`` (B, hist_bins), when given, are the
        image's :meth:`histogram_counts` computed earlier (they are not recomputed)."""
        x = self.local_norm(self.input_pool(image))
        feats = self.blocks(F.elu(self.stem_bn(self.stem(x)))).mean(dim=(2, 3, 4))
        if self.histogram is None:
            return feats
        if hist_counts is None:
            hist_counts = (self.histogram.counts(x) if self._hist_shares_input
                           else self.histogram_counts(image))
        elif hist_counts.shape != (image.shape[0], self.histogram.bins):
            raise ShapeError(f"`hist_counts` must have shape ({image.shape[0]}, "
                             f"{self.histogram.bins}), got {tuple(hist_counts.shape)}")
        # fp32 (as the head that reads it): a bf16 copy would round the prior's inputs
        return torch.cat([feats.float(), self.histogram.standardise(hist_counts).float()],
                         dim=1)


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


class SiteInputMixin:
    """Site one-hot codes for a module whose ``config.sites`` lists the sites it knows."""

    config: BackboneConfig

    def site_codes(self, names: Any, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, len(config.sites)) float codes for the site names ``names``: one-hot for a known
        site, the average code (1/S everywhere) for an unknown or missing one."""
        sites = self.config.sites
        index = {name: i for i, name in enumerate(sites)}
        codes = torch.full((len(names), len(sites)), 1.0 / max(len(sites), 1))
        for row, name in enumerate(names):
            i = index.get(str(name))
            if i is not None:
                codes[row] = 0.0
                codes[row, i] = 1.0
        return codes.to(device)

    def _site_part(self, site: torch.Tensor | None, b: int, like: torch.Tensor) -> torch.Tensor:
        n = len(self.config.sites)
        if site is None:
            return like.new_full((b, n), 1.0 / n)
        if not isinstance(site, torch.Tensor) or site.shape != (b, n):
            got = tuple(site.shape) if isinstance(site, torch.Tensor) else type(site).__name__
            raise ShapeError(f"`site` must be a ({b}, {n}) tensor of site codes (see "
                             f"site_codes), got {got}")
        return site.to(like.dtype)


class AgeRegressor(SiteInputMixin, AgeScaleMixin, nn.Module):
    """Stage 1 of the cascade: image (+ sex) -> age in years.

    Args:
        config: backbone and head sizes. With the defaults this module has 109,871 parameters
            (+32 per known site).

    Buffers:
        age_mean, age_std: the affine map from the head's standardised output to years
            (set from the training ages with :meth:`set_age_scale`; defaults 50 and 20).

    Shapes:
        forward(image (B, 1, X, Y, Z), sex (B,) or None, site (B, S) or None, hist_counts
        (B, hist_bins) or None) -> age (B,) in years. ``sex`` uses +1 male, -1 female, 0
        unknown; None means unknown for every subject. ``site`` holds :meth:`site_codes` (only
        when ``config.sites`` is not empty; None means unknown sites). ``hist_counts`` are the
        image's :meth:`ScaleDense.histogram_counts` when already computed (None computes them).
    """

    def __init__(self, config: BackboneConfig | None = None):
        super().__init__()
        self.config = config or BackboneConfig()
        self.backbone = ScaleDense(self.config)
        n_sex = self.config.sex_features
        self.sex_branch = SexBranch(n_sex) if n_sex > 0 else None
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Sequential(
            nn.Linear(self.backbone.out_features + n_sex + len(self.config.sites),
                      self.config.head_hidden),
            nn.ELU(),
            nn.Linear(self.config.head_hidden, 1),
        )
        self.register_buffer("age_mean", torch.tensor(50.0))
        self.register_buffer("age_std", torch.tensor(20.0))
        # Linear prior on the histogram branch, one linear model per known site (row s of
        # prior_weight / prior_bias; a single row without sites), fitted in closed form
        # (rankcore.train.prior) before training; zero = no prior.
        n_models = max(len(self.config.sites), 1)
        if self.config.hist_bins:  # start at the prior: the network learns what it misses
            with torch.no_grad():
                self.head[-1].weight.mul_(0.1)
                self.head[-1].bias.zero_()
        self.register_buffer("prior_weight", torch.zeros(n_models, self.config.hist_bins)
                             if self.config.hist_bins else torch.zeros(0))
        self.register_buffer("prior_bias", torch.zeros(n_models if self.config.hist_bins else 0))

    def prior(self, hist: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        """The closed-form prior (B,) in standardised age units from standardised histogram
        features (B, hist_bins) and site codes (B, S) (or None): the site's own linear model,
        or for a code spread over several sites (an unknown site) the code-weighted mean of
        theirs."""
        per_site = hist @ self.prior_weight.to(hist.dtype).T + self.prior_bias.to(hist.dtype)
        if not self.config.sites:
            return per_site[:, 0]
        return (per_site * self._site_part(site, hist.shape[0], hist)).sum(dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Weights saved before the prior was per site hold one pooled model: the histogram
        # weights then one intercept per site, (hist_bins + S,), and a scalar bias.
        w, b = state_dict.get(prefix + "prior_weight"), state_dict.get(prefix + "prior_bias")
        bins, n = self.config.hist_bins, len(self.config.sites)
        if w is not None and b is not None and bins and w.ndim == 1 and b.ndim == 0 \
                and w.numel() == bins + n:
            state_dict[prefix + "prior_weight"] = w[:bins].expand(max(n, 1), bins).clone()
            bias = b + (w[bins:] if n else torch.zeros(1, dtype=w.dtype))
            state_dict[prefix + "prior_bias"] = bias.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, image: torch.Tensor, sex: torch.Tensor | None,
                 site: torch.Tensor | None = None, hist_counts: torch.Tensor | None = None,
                 ) -> torch.Tensor:
        """Image features concatenated with the sex branch and the site codes:
        (B, out_features + sex_features + len(sites)), before dropout."""
        check_image(image)
        feats = self.backbone(image, hist_counts)
        if self.sex_branch is not None:
            if sex is None:
                sex = torch.zeros(image.shape[0], device=image.device)
            elif sex.shape != (image.shape[0],):
                raise ShapeError(f"`sex` must have shape ({image.shape[0]},), got "
                                 f"{tuple(sex.shape)}")
            feats = torch.cat([feats, self.sex_branch(sex).to(feats.dtype)], dim=1)
        if self.config.sites:
            feats = torch.cat([feats, self._site_part(site, image.shape[0], feats)], dim=1)
        return feats

    def forward(self, image: torch.Tensor, sex: torch.Tensor | None = None,
                site: torch.Tensor | None = None, hist_counts: torch.Tensor | None = None,
                ) -> torch.Tensor:
        feats = self.features(image, sex, site, hist_counts)
        # The head, the prior and the age in fp32 even under autocast: a bf16 age moves in
        # steps of 0.25-0.5 years.
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            z = self.head(self.dropout(feats))[:, 0]
            if self.config.hist_bins:
                end = self.backbone.out_features
                z = z + self.prior(feats[:, end - self.config.hist_bins:end], site)
            return self.age_mean.float() + self.age_std.float() * z
