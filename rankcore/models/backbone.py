"""ScaleDense-style 3-D backbone and the stage-1 age regressor built on it.

The design follows the ScaleDense network of Cheng et al. (IEEE TMI 2021): a stem convolution,
then blocks of asymmetric convolutions -> norm -> ELU -> squeeze-and-excitation -> pooling,
each concatenating its pooled input with its new features, then global pooling and a small head;
sex enters through a small fully connected branch. The defaults are sized for CPU training on
the default 2 mm volumes: no input pooling, a 5 x 5 x 5 stem of stride 2 that reads the 2 mm
voxels, so the first dense block works at 4 mm, and narrow blocks (the reference's widths
reach ~100 M parameters per stage). On a 3 mm cache a stride-1 stem followed by a max-pool
(``stem_pool``) keeps the stem at the cache's resolution.
The input may hold several channels (the z-scored intensity, then tissue probability maps);
no local contrast normalisation is applied to the CNN's input by default, so the tissue
contrast of the cache's global z-score inside the brain reaches the first convolution.

Next to the CNN, and standardised on the same scale before the head:

- the globally pooled CNN features, standardised across subjects (``feature_norm``);
- an intensity-histogram branch on channel 0 (:class:`~rankcore.models.blocks.IntensityHistogram`,
  with its own local contrast normalisation), gradient-free and unchanged by a left-right
  flip, so its counts are computed once per subject in training
  (:class:`rankcore.train.data.SubjectData`);
- tabular features of the subject (tissue volumes, regional fractions; ``features``),
  standardised with training-set statistics, a missing value becoming the mean;
- the acquisition site as an optional one-hot input (``sites``).

Age is predicted in standardised units and un-standardised inside the model::

    age = age_mean + age_std * (head(features) + prior(histogram, tabular, site))

The prior is a linear map per site fitted in closed form before training
(:mod:`rankcore.train.prior`; zero when not fitted). The head's last layer starts at zero, so a
fresh model predicts the prior exactly and the network learns a residual on top of it.
``age_mean`` and ``age_std`` are buffers (saved with the weights) that the training loop sets
from the training ages with :meth:`AgeRegressor.set_age_scale`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rankcore.errors import InputError, ShapeError
from rankcore.models.blocks import DenseBlock, IntensityHistogram, LocalContrastNorm, make_norm
from rankcore.models.config import BackboneConfig

__all__ = ["AgeRegressor", "AgeScaleMixin", "BackboneConfig", "ScaleDense", "SexBranch",
           "SiteInputMixin", "check_features", "check_image", "count_parameters"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_image(image: torch.Tensor, name: str = "image", channels: int | None = None) -> None:
    """Raise unless ``image`` is a float (B, C, X, Y, Z) tensor (C == ``channels`` when given).

    Raises:
        InputError: not a floating tensor.
        ShapeError: not 5-D, or another number of channels than ``channels``.
    """
    if not isinstance(image, torch.Tensor):
        raise InputError(f"`{name}` must be a tensor, got {type(image).__name__}")
    if image.ndim != 5 or (channels is not None and image.shape[1] != channels):
        c = "C" if channels is None else str(channels)
        raise ShapeError(f"`{name}` must have shape (B, {c}, X, Y, Z), got {tuple(image.shape)}"
                         + ("" if channels is None or image.ndim != 5 else
                            f": this model was trained on {channels}-channel images"))
    if not image.is_floating_point():
        raise InputError(f"`{name}` must be a floating tensor, got dtype {image.dtype}")


def check_features(features: torch.Tensor | None, b: int, n: int) -> None:
    """Raise ShapeError unless ``features`` is None or a (b, n) tensor."""
    if features is None:
        return
    if not isinstance(features, torch.Tensor) or features.shape != (b, n):
        got = tuple(features.shape) if isinstance(features, torch.Tensor) \
            else type(features).__name__
        raise ShapeError(f"`features` must have shape ({b}, {n}) (the tabular features the "
                         f"model was trained with), got {got}")


class ScaleDense(nn.Module):
    """The feature extractor: input pooling -> stem -> dense blocks -> global average pool,
    standardised, then the histogram and tabular inputs standardised alongside.

    Args:
        config: sizes (see :class:`BackboneConfig`).

    Buffers:
        feature_mean, feature_std: (F,) standardisation of the tabular features (set from the
            training data with :meth:`set_feature_scale`; 0 and 1 until then).

    Shapes:
        input (B, in_channels, X, Y, Z) float, hist_counts (B, hist_bins) or None, features
        (B, F) or None -> output (B, ``out_features``) = (B, cnn_features + hist_bins + F).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        p = config.input_pool
        self.input_pool = nn.AvgPool3d(p, ceil_mode=True) if p > 1 else nn.Identity()
        self.local_norm = (LocalContrastNorm(config.local_norm) if config.local_norm
                           else nn.Identity())
        self.stem = nn.Conv3d(config.in_channels, config.stem_channels, config.stem_kernel,
                              stride=config.stem_stride, padding=config.stem_kernel // 2,
                              bias=False)
        self.stem_bn = make_norm(config.norm, config.stem_channels)
        self.stem_pool = (nn.MaxPool3d(config.stem_pool, ceil_mode=True) if config.stem_pool > 1
                          else nn.Identity())
        blocks = []
        channels = config.stem_channels
        for g in config.growth:
            block = DenseBlock(channels, g, config.se_reduction, config.norm)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.cnn_features = channels
        self.feature_norm: nn.Module = {
            "batch": lambda: nn.BatchNorm1d(channels, affine=False),
            "layer": lambda: nn.LayerNorm(channels, elementwise_affine=False),
            "none": nn.Identity,
        }[config.feature_norm]()
        self.histogram = IntensityHistogram(config.hist_bins) if config.hist_bins else None
        # The histogram reads the CNN's input when both see the same grid and normalisation.
        self._hist_shares_input = (config.hist_pool == p
                                   and config.hist_window == config.local_norm
                                   and config.in_channels == 1)
        hp = config.hist_pool
        self.hist_pool = nn.AvgPool3d(hp, ceil_mode=True) if hp > 1 else nn.Identity()
        self.hist_norm = (LocalContrastNorm(config.hist_window) if config.hist_window
                          else nn.Identity())
        n_tab = len(config.features)
        self.register_buffer("feature_mean", torch.zeros(n_tab))
        self.register_buffer("feature_std", torch.ones(n_tab))
        self.out_features = channels + config.hist_bins + n_tab

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Weights saved before tabular features existed have no feature buffers (F = 0).
        if not self.config.features:
            for key in ("feature_mean", "feature_std"):
                state_dict.setdefault(prefix + key, getattr(self, key).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def histogram_key(self) -> tuple[Any, ...]:
        """What the histogram counts of an image depend on (a cache key for them)."""
        h = self.histogram
        return (self.config.hist_pool, self.config.hist_window,
                None if h is None else (h.bins, h.low, h.high))

    @torch.no_grad()
    def histogram_counts(self, image: torch.Tensor) -> torch.Tensor:
        """Unstandardised histogram-branch counts (B, hist_bins) of ``image``'s channel 0
        (no gradient).

        They do not change under a left-right flip of the image (the normalisation window is
        symmetric and a histogram ignores positions), so training caches them per subject.
        """
        if self.histogram is None:
            raise InputError("this backbone has no histogram branch (hist_bins = 0)")
        return self.histogram.counts(self.hist_norm(self.hist_pool(image[:, :1])))

    @torch.no_grad()
    def set_feature_scale(self, features: Any) -> None:
        """Standardise the tabular features with the mean and sd (floored at 1e-6) of the
        finite values of ``features`` (N, F) per column (a column with none: 0 and 1)."""
        x = np.asarray(features, dtype=np.float64).reshape(-1, len(self.config.features))
        finite = np.isfinite(x)
        n = finite.sum(axis=0)
        filled = np.where(finite, x, 0.0)
        mean = np.where(n > 0, filled.sum(axis=0) / np.maximum(n, 1), 0.0)
        var = np.where(finite, (x - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n - 1, 1)
        std = np.where(n > 1, np.sqrt(var), 1.0)
        self.feature_mean.copy_(torch.from_numpy(mean))
        self.feature_std.copy_(torch.from_numpy(np.maximum(std, 1e-6)))

    def standardise_features(self, features: torch.Tensor | None, b: int,
                             like: torch.Tensor) -> torch.Tensor:
        """Tabular features (b, F), standardised; None or NaN entries become 0 (the mean)."""
        n = len(self.config.features)
        if features is None:
            return like.new_zeros((b, n))
        check_features(features, b, n)
        z = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).to(like.dtype)

    def forward(self, image: torch.Tensor, hist_counts: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised inputs of the head (B, out_features): CNN features, histogram,
        tabular features. ``hist_counts`` (B, hist_bins), when given, are the image's
        :meth:`histogram_counts` computed earlier (they are not recomputed)."""
        b = image.shape[0]
        x = self.local_norm(self.input_pool(image))
        x = self.stem_pool(F.elu(self.stem_bn(self.stem(x))))
        feats = self.blocks(x).mean(dim=(2, 3, 4))
        norm = self.feature_norm
        if isinstance(norm, nn.BatchNorm1d) and self.training and b == 1:
            # one subject per worker has no spread to standardise by: use the running stats
            parts = [F.batch_norm(feats, norm.running_mean, norm.running_var, eps=norm.eps)]
        else:
            parts = [norm(feats)]
        if self.histogram is not None:
            if hist_counts is None:
                hist_counts = (self.histogram.counts(x) if self._hist_shares_input
                               else self.histogram_counts(image))
            elif hist_counts.shape != (b, self.histogram.bins):
                raise ShapeError(f"`hist_counts` must have shape ({b}, "
                                 f"{self.histogram.bins}), got {tuple(hist_counts.shape)}")
            # fp32, like the head that reads it: a bf16 copy would round the prior's inputs
            parts.append(self.histogram.standardise(hist_counts).float())
        if self.config.features:
            parts.append(self.standardise_features(features, b, feats))
        return torch.cat([p.float() for p in parts], dim=1)


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
    """Stage 1 of the cascade: image (+ sex, site, tabular features) -> age in years.

    Args:
        config: backbone and head sizes. With the defaults this module has 109,871 parameters
            (+32 per known site and per tabular feature).

    Buffers:
        age_mean, age_std: the affine map from the head's standardised output to years
            (set from the training ages with :meth:`set_age_scale`; defaults 50 and 20).
        prior_weight, prior_bias: (max(S, 1), P) and (max(S, 1),): the closed-form prior,
            one linear model per known site over the P = hist_bins + F standardised
            histogram and tabular inputs (:mod:`rankcore.train.prior`); zero = no prior.

    Shapes:
        forward(image (B, in_channels, X, Y, Z), sex (B,) or None, site (B, S) or None,
        hist_counts (B, hist_bins) or None, features (B, F) or None) -> age (B,) in years.
        ``sex`` uses +1 male, -1 female, 0 unknown; None means unknown for every subject.
        ``site`` holds :meth:`site_codes` (only when ``config.sites`` is not empty; None
        means unknown sites). ``hist_counts`` are the image's
        :meth:`ScaleDense.histogram_counts` when already computed (None computes them).
        ``features`` are the raw tabular features named by ``config.features`` (NaN or None:
        missing, read as the training mean).
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
        n_models, p = max(len(self.config.sites), 1), self.config.prior_inputs
        self.register_buffer("prior_weight", torch.zeros(n_models, p) if p else torch.zeros(0))
        self.register_buffer("prior_bias", torch.zeros(n_models if p else 0))
        self.zero_residual()  # a fresh model predicts the prior: the network learns a residual

    @torch.no_grad()
    def zero_residual(self) -> None:
        """Zero the head's last layer: the model then predicts the prior alone (the mean
        training age without a prior)."""
        self.head[-1].weight.zero_()
        self.head[-1].bias.zero_()

    def prior(self, inputs: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        """The closed-form prior (B,) in standardised age units from the standardised prior
        inputs (B, P) (histogram, then tabular features) and site codes (B, S) (or None): the
        site's own linear model, or for a code spread over several sites (an unknown site)
        the code-weighted mean of theirs."""
        per_site = (inputs @ self.prior_weight.to(inputs.dtype).T
                    + self.prior_bias.to(inputs.dtype))
        if not self.config.sites:
            return per_site[:, 0]
        return (per_site * self._site_part(site, inputs.shape[0], inputs)).sum(dim=1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Weights saved before the prior was per site hold one pooled model: the histogram
        # weights then one intercept per site, (hist_bins + S,), and a scalar bias.
        w, b = state_dict.get(prefix + "prior_weight"), state_dict.get(prefix + "prior_bias")
        bins, n = self.config.prior_inputs, len(self.config.sites)
        if w is not None and b is not None and bins and w.ndim == 1 and b.ndim == 0 \
                and w.numel() == bins + n:
            state_dict[prefix + "prior_weight"] = w[:bins].expand(max(n, 1), bins).clone()
            bias = b + (w[bins:] if n else torch.zeros(1, dtype=w.dtype))
            state_dict[prefix + "prior_bias"] = bias.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, image: torch.Tensor, sex: torch.Tensor | None,
                 site: torch.Tensor | None = None, hist_counts: torch.Tensor | None = None,
                 features: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input: standardised backbone outputs, sex branch, site codes
        (B, out_features + sex_features + len(sites)), before dropout."""
        check_image(image, channels=self.config.in_channels)
        feats = self.backbone(image, hist_counts, features)
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
                features: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(image, sex, site, hist_counts, features)
        # The head, the prior and the age in fp32 even under autocast: a bf16 age moves in
        # steps of 0.25-0.5 years.
        with torch.autocast(feats.device.type, enabled=False):
            feats = feats.float()
            z = self.head(self.dropout(feats))[:, 0]
            p = self.config.prior_inputs
            if p:
                end = self.backbone.out_features
                z = z + self.prior(feats[:, end - p:end], site)
            return self.age_mean.float() + self.age_std.float() * z
