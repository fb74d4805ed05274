"""Building blocks of the ScaleDense-style backbone: asymmetric convolution, squeeze-and-excitation,
and the dense block that concatenates its pooled input with its new features.

All modules take batch-first 5-D tensors (B, C, X, Y, Z) and work in either memory format
(contiguous or ``torch.channels_last_3d``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AsymConv3d", "DenseBlock", "SqueezeExcite3d"]


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
    """AsymConv3d -> BN -> ELU -> squeeze-and-excitation -> max-pool, concatenated with the
    max-pooled input (dense connectivity).

    Args:
        in_channels: channels of the input.
        growth: new channels this block adds.
        se_reduction: reduction of the squeeze-and-excitation bottleneck.

    Shapes:
        input (B, C, X, Y, Z) -> output (B, C + growth, ceil(X/2), ceil(Y/2), ceil(Z/2)).
    """

    def __init__(self, in_channels: int, growth: int, se_reduction: int):
        super().__init__()
        self.conv = AsymConv3d(in_channels, growth)
        self.bn = nn.BatchNorm3d(growth)
        self.se = SqueezeExcite3d(growth, se_reduction)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.out_channels = in_channels + growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.se(F.elu(self.bn(self.conv(x))))
        return torch.cat([self.pool(x), self.pool(new)], dim=1)
