"""Building blocks of the ScaleDense-style backbone: asymmetric convolution, squeeze-and-excitation,
and the dense block that concatenates its pooled input with its new features.

All modules take batch-first 5-D tensors (B, C, X, Y, Z) and work in either memory format
(contiguous or ``torch.channels_last_3d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "AsymConv3d", "DenseBlock", "IntensityHistogram", "LocalContrastNorm",
           "SqueezeExcite3d", "make_norm"]

#: Normalisation layers of the backbone (see :func:`make_norm`).
NORMS = ("batch", "group")


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm3d; ``"group"``: GroupNorm with groups of 4 channels.

    Group norm uses each image's own statistics, in training and evaluation alike. Batch norm's
    running averages, taken over batches of 16 while the weights still move, made validation
    predictions jump by whole decades of years from one epoch to the next on 300-subject
    cohorts (with a stable rank order: the same shift for everyone); group norm does not.
    """
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    raise ValueError(f"`norm` must be one of {NORMS}, got {kind!r}")


class AsymConv3d(nn.Module):
    """Sum of a 3×3×3 convolution and three 1-D (3×1×1, 1×3×1, 1×1×3) convolutions.

    This is the asymmetric convolution of the ScaleDense backbone (Cheng et al., TMI 2021,
    after ACNet). Because convolution is linear in its kernel, the four branches are fused into
    one 3×3×3 kernel at every forward pass (the 1-D kernels are zero-padded onto the central
    lines of the cube), so the cost is one convolution instead of four while the parameters,
    gradients and outputs are exactly those of the four summed branches.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.

    Shapes:
        input (B, in_channels, X, Y, Z) -> output (B, out_channels, X, Y, Z) (padding 1).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.cube = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3, 3))
        self.line_x = nn.Parameter(torch.empty(out_channels, in_channels, 3, 1, 1))
        self.line_y = nn.Parameter(torch.empty(out_channels, in_channels, 1, 3, 1))
        self.line_z = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1, 3))
        for w in (self.cube, self.line_x, self.line_y, self.line_z):
            nn.init.kaiming_uniform_(w, a=5**0.5)  # nn.Conv3d's default initialisation

    def fused_weight(self) -> torch.Tensor:
        """The single (out, in, 3, 3, 3) kernel equal to the sum of the four branches."""
        # F.pad pads the last dims first: (z_lo, z_hi, y_lo, y_hi, x_lo, x_hi).
        return (self.cube
                + F.pad(self.line_x, (1, 1, 1, 1, 0, 0))
                + F.pad(self.line_y, (1, 1, 0, 0, 1, 1))
                + F.pad(self.line_z, (0, 0, 1, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.fused_weight(), padding=1)


class SqueezeExcite3d(nn.Module):
    """Channel attention: global average pool -> FC -> ELU -> FC -> sigmoid -> rescale channels.

    Args:
        channels: channels of the input (and output).
        reduction: channel reduction of the bottleneck (hidden = max(channels // reduction, 4)).
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4))
        s = torch.sigmoid(self.fc2(F.elu(self.fc1(s))))
        return x * s[:, :, None, None, None]


class DenseBlock(nn.Module):
    """AsymConv3d -> norm -> ELU -> squeeze-and-excitation -> max-pool, concatenated with the
    max-pooled input (dense connectivity).

    Args:
        in_channels: channels of the input.
        growth: new channels this block adds.
        se_reduction: reduction of the squeeze-and-excitation bottleneck.
        norm: ``"batch"`` or ``"group"`` (see :func:`make_norm`).

    Shapes:
        input (B, C, X, Y, Z) -> output (B, C + growth, ceil(X/2), ceil(Y/2), ceil(Z/2)).
    """

    def __init__(self, in_channels: int, growth: int, se_reduction: int, norm: str = "batch"):
        super().__init__()
        self.conv = AsymConv3d(in_channels, growth)
        self.bn = make_norm(norm, growth)
        self.se = SqueezeExcite3d(growth, se_reduction)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.out_channels = in_channels + growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.se(F.elu(self.bn(self.conv(x))))
        return torch.cat([self.pool(x), self.pool(new)], dim=1)


class LocalContrastNorm(nn.Module):
    """Parameter-free local z-scoring inside the brain: (x − local mean) / local sd.

    A smooth multiplicative bias field b and a site's gain and offset turn the image T into
    g·b·T + o; over a window small enough for b to be nearly constant, subtracting the local
    mean and dividing by the local standard deviation cancels all three, leaving the tissue
    contrast relative to its neighbourhood (the ageing signal: grey matter darkening against
    white matter, widening CSF spaces). Brain voxels are the non-zero ones (the cache stores 0
    outside the brain mask); means and variances are taken over brain voxels only (normalised
    box sums, computed separably with running sums), and the output is 0 outside the brain.

    Args:
        window: odd box width in voxels of the input grid.
        eps: added to the local variance (input units squared) so that flat regions, whose
            variance is only noise, are not blown up.

    Shapes:
        input (B, C, X, Y, Z) -> output of the same shape.
    """

    def __init__(self, window: int, eps: float = 1e-2):
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError(f"`window` must be an odd integer >= 3, got {window!r}")
        self.window = window
        self.eps = eps

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"

    def _box(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the window around each voxel (zero outside the grid), by running sums
        along each axis: O(1) per voxel whatever the window."""
        k, p = self.window, self.window // 2
        for dim in (2, 3, 4):
            pad = [0, 0] * (4 - dim) + [p + 1, p]  # F.pad lists the last dim first
            c = F.pad(t, pad).cumsum(dim)
            n = t.shape[dim]
            t = c.narrow(dim, k, n) - c.narrow(dim, 0, n)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x != 0).to(x.dtype)
        n = len(x)
        xm = x * mask
        # one pass of the box filter over [mask, x·mask, x²·mask] stacked on the batch axis
        sums = self._box(torch.cat([mask, xm, xm * x], dim=0))
        den = sums[:n].clamp_min(1e-3)
        mean = sums[n:2 * n] / den
        var = (sums[2 * n:] / den - mean * mean).clamp_min(0.0)
        return (x - mean) * torch.rsqrt(var + self.eps) * mask


class IntensityHistogram(nn.Module):
    """Fixed (parameter-free, gradient-free) histogram of the brain voxels' intensities.

    ``bins`` equal bins over [``low``, ``high``] (values outside go to the end bins); each
    brain voxel (non-zero) is split between its two nearest bin centres (linear binning), so
    the counts move smoothly with the intensities. :meth:`counts` gives the fraction of brain
    voxels per bin times ``bins`` (1 for a flat histogram); the forward pass standardises them
    with the buffers ``mean`` and ``std`` (set from the training data with :meth:`set_scale`;
    0 and 1 until then). Computed under ``no_grad`` with one ``bincount`` per batch:
    O(voxels), not O(voxels × bins).

    On locally normalised input (:class:`LocalContrastNorm`) this is the distribution of
    tissue contrast within the brain: the global signal of grey-matter loss that a small CNN
    trained on a few hundred subjects does not find by itself (it memorises spatial detail
    instead).

    Shapes:
        input (B, 1, X, Y, Z) -> output (B, bins).
    """

    def __init__(self, bins: int, low: float = -3.0, high: float = 3.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"`bins` must be >= 2, got {bins!r}")
        self.bins, self.low, self.high = bins, float(low), float(high)
        self.register_buffer("mean", torch.zeros(bins))
        self.register_buffer("std", torch.ones(bins))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, low={self.low}, high={self.high}"

    @torch.no_grad()
    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """Fractions of brain voxels per bin, times ``bins``: (B, bins) float32."""
        b, k = x.shape[0], self.bins
        v = x.reshape(b, -1).float()
        finite = torch.isfinite(v)
        bad = ~finite.all(dim=1)  # a NaN or inf voxel makes that image's histogram NaN
        mask = (v != 0) & finite
        v = torch.where(finite, v, torch.zeros_like(v))
        pos = ((v - self.low) / (self.high - self.low) * (k - 1)).clamp(0, k - 1)
        lo = pos.floor().clamp(max=k - 2)
        frac = pos - lo
        offset = (torch.arange(b, device=x.device) * k)[:, None]
        idx = (lo.long() + offset)[mask]
        w_hi = frac[mask]
        hist = torch.bincount(idx, weights=1.0 - w_hi, minlength=b * k)
        hist = hist + torch.bincount(idx + 1, weights=w_hi, minlength=b * k)
        n = mask.sum(dim=1, keepdim=True).clamp_min(1).float()
        out = hist.view(b, k).float() / n * k
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)

    @torch.no_grad()
    def set_scale(self, counts: torch.Tensor) -> None:
        """Standardise with the mean and sd (floored at 1e-3) of ``counts`` (N, bins)."""
        self.mean.copy_(counts.mean(dim=0))
        self.std.copy_(counts.std(dim=0).clamp_min(1e-3))

    def standardise(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts (B, bins) from :meth:`counts`, standardised with ``mean`` and ``std``."""
        return (counts.to(self.mean) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardise(self.counts(x))
