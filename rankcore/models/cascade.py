"""The two-stage cascade of Cheng et al. (IEEE TMI 2021): stage 1 estimates age, stage 2 corrects.

Stage 2 (:class:`CorrectionRegressor`) is a separate network that sees the image, sex and stage
1's estimate s and predicts a bounded correction::

    base       = s                         (default: continuous)
               = bin_width * round(s / bin_width)   (the paper's discretised form, e.g. 5 y)
    correction = max_correction * tanh(head(image features, sex, base))
    final      = base + correction

Why stage 2 cannot collapse to one value per stage-1 bin (the reference's reported defect):
the correction is a function of the image features by construction — the head takes the
pooled image features as its main input and the stage-1 estimate only as one extra embedded
scalar, its last layer is initialised small but non-zero (so a fresh stage 2 already varies with
the image), and the bound is a smooth tanh rather than a clamp (no flat region that would stop
the gradient). The default input is the continuous estimate, so subjects in the same 5-year bin
are not even given the same number. tests/test_models.py checks that images sharing a stage-1
bin get different outputs, for a random stage 2 and after a few training steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankcore.errors import InputError, ShapeError
from rankcore.models.backbone import (
    AgeRegressor,
    AgeScaleMixin,
    BackboneConfig,
    ScaleDense,
    SexBranch,
    SiteInputMixin,
    check_image,
)

__all__ = ["Cascade", "CascadeConfig", "CorrectionRegressor", "discretise"]


@dataclass(frozen=True)
class CascadeConfig:
    """How stage 2 uses stage 1's estimate (validated on construction).

    Attributes:
        max_correction: bound (years) on stage 2's correction: |final − base| < max_correction.
        bin_width: None (default) feeds stage 1's estimate as is; a positive number rounds it
            to a multiple of ``bin_width`` years first (the paper uses 5).
        age_features: width of the embedding of the (standardised) stage-1 estimate.
    """

    max_correction: float = 10.0
    bin_width: float | None = None
    age_features: int = 8

    def __post_init__(self) -> None:
        m = self.max_correction
        if isinstance(m, bool) or not isinstance(m, int | float) or not m > 0 or m == float("inf"):
            raise InputError(f"`max_correction` must be a positive number of years, got {m!r}")
        b = self.bin_width
        if b is not None and (isinstance(b, bool) or not isinstance(b, int | float)
                              or not b > 0 or b == float("inf")):
            raise InputError(f"`bin_width` must be None or a positive number of years, got {b!r}")
        a = self.age_features
        if isinstance(a, bool) or not isinstance(a, int) or a < 1:
            raise InputError(f"`age_features` must be an integer >= 1, got {a!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CascadeConfig:
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"`cascade` has unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def discretise(age: torch.Tensor, bin_width: float | None) -> torch.Tensor:
    """Round ``age`` (years) to the nearest multiple of ``bin_width``; None returns it unchanged."""
    if bin_width is None:
        return age
    return torch.round(age / bin_width) * bin_width


class CorrectionRegressor(SiteInputMixin, AgeScaleMixin, nn.Module):
    """Stage 2 of the cascade: (image, sex, stage-1 age) -> refined age in years.

    Args:
        config: backbone and head sizes (its own backbone, not shared with stage 1).
        cascade: how the stage-1 estimate is used and how far stage 2 may move it.

    With the default configs this module has 110,143 parameters (+32 per known site and per
    tabular feature).

    Buffers:
        age_mean, age_std: standardisation of the stage-1 input (set with :meth:`set_age_scale`
            from the training ages, like :class:`AgeRegressor`).

    Shapes:
        forward(image (B, in_channels, X, Y, Z), stage1 (B,) years, sex (B,) or None, site
        (B, S) or None, hist_counts (B, hist_bins) or None, features (B, F) or None) -> final
        (B,) years (``site``, ``hist_counts`` and ``features``: see :class:`AgeRegressor`).
        :meth:`forward_parts` also returns the base (B,) and the correction (B,).
    """

    def __init__(self, config: BackboneConfig | None = None, cascade: CascadeConfig | None = None):
        super().__init__()
        self.config = config or BackboneConfig()
        self.cascade = cascade or CascadeConfig()
        self.backbone = ScaleDense(self.config)
        n_sex = self.config.sex_features
        self.sex_branch = SexBranch(n_sex) if n_sex > 0 else None
        self.age_branch = nn.Linear(1, self.cascade.age_features)
        self.dropout = nn.Dropout(self.config.dropout)
        n_in = (self.backbone.out_features + n_sex + self.cascade.age_features
                + len(self.config.sites))
        self.head = nn.Sequential(
            nn.Linear(n_in, self.config.head_hidden),
            nn.ELU(),
            nn.Linear(self.config.head_hidden, 1),
        )
        # Small but non-zero: a fresh stage 2 makes small, image-dependent corrections.
        with torch.no_grad():
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()
        self.register_buffer("age_mean", torch.tensor(50.0))
        self.register_buffer("age_std", torch.tensor(20.0))

    def forward_parts(self, image: torch.Tensor, stage1: torch.Tensor,
                      sex: torch.Tensor | None = None, site: torch.Tensor | None = None,
                      hist_counts: torch.Tensor | None = None,
                      features: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (final, base, correction), each (B,) in years (``hist_counts``: the
        image's histogram-branch counts when already computed, see
        :meth:`~rankcore.models.backbone.ScaleDense.forward`)."""
        check_image(image, channels=self.config.in_channels)
        b = image.shape[0]
        if not isinstance(stage1, torch.Tensor) or stage1.shape != (b,):
            got = tuple(stage1.shape) if isinstance(stage1, torch.Tensor) else type(stage1)
            raise ShapeError(f"`stage1` must have shape ({b},), got {got}")
        base = discretise(stage1.to(self.age_mean.dtype), self.cascade.bin_width)
        parts = [self.backbone(image, hist_counts, features)]
        if self.sex_branch is not None:
            if sex is None:
                sex = torch.zeros(b, device=image.device)
            elif sex.shape != (b,):
                raise ShapeError(f"`sex` must have shape ({b},), got {tuple(sex.shape)}")
            parts.append(self.sex_branch(sex))
        s_std = ((base - self.age_mean) / self.age_std)[:, None]
        parts.append(F.elu(self.age_branch(s_std.to(self.age_branch.weight.dtype))))
        if self.config.sites:
            parts.append(self._site_part(site, b, parts[0]))
        feats = self.dropout(torch.cat([p.float() for p in parts], dim=1))
        with torch.autocast(feats.device.type, enabled=False):  # fp32 head: see AgeRegressor
            z = self.head(feats)[:, 0]
        m = self.cascade.max_correction
        correction = m * torch.tanh(z)
        return base + correction, base, correction

    def forward(self, image: torch.Tensor, stage1: torch.Tensor,
                sex: torch.Tensor | None = None, site: torch.Tensor | None = None,
                hist_counts: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_parts(image, stage1, sex, site, hist_counts, features)[0]

    @torch.no_grad()
    def zero_residual(self) -> None:
        """Zero the head's last layer: the correction is then 0 and the final age stage 1's
        estimate (rounded when ``bin_width`` is set)."""
        self.head[-1].weight.zero_()
        self.head[-1].bias.zero_()


class Cascade(nn.Module):
    """Stage 1 and stage 2 together, for prediction: image (+ sex) -> (final, stage-1) ages.

    Args:
        stage1: the trained :class:`AgeRegressor`.
        stage2: the trained :class:`CorrectionRegressor`.

    Shapes:
        forward(image (B, in_channels, X, Y, Z), sex (B,) or None, site (B, S) or None,
        features (B, F) or None) -> (final (B,), stage1 (B,)), years (both stages must know
        the same sites). When both stages read the same histogram (same ``histogram_key``)
        it is computed once.
    """

    def __init__(self, stage1: AgeRegressor, stage2: CorrectionRegressor):
        super().__init__()
        self.stage1 = stage1
        self.stage2 = stage2

    def forward(self, image: torch.Tensor, sex: torch.Tensor | None = None,
                site: torch.Tensor | None = None, features: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b1, b2 = self.stage1.backbone, self.stage2.backbone
        counts = None  # computed once when both stages read the same histogram
        if b1.histogram is not None and b2.histogram is not None \
                and b1.histogram_key() == b2.histogram_key():
            check_image(image)
            counts = b1.histogram_counts(image)
        s1 = self.stage1(image, sex, site, counts, features)
        return self.stage2(image, s1, sex, site, counts, features), s1
