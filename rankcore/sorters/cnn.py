"""A length-agnostic 1-D convolutional sorter (SoDeep's CNN family, made length-agnostic).

Convolutions over positions only mix neighbours, which say nothing about ranks on their own;
each block therefore also adds a context vector pooled over the whole sequence (mean and max of
the block's features), which lets a position compare its own features with the distribution of
all values. Nothing depends on N, so the sorter accepts any length.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rankcore.sorters.base import Sorter


class _Block(nn.Module):
    """Residual block: dilated conv over positions plus pooled global context, then GELU."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size // 2))
        self.context = nn.Linear(2 * channels, channels)
        self.mix = nn.Conv1d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:                        # (B, C, N)
        pooled = torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=-1)          # (B, 2C)
        u = F.gelu(self.conv(h) + self.context(pooled).unsqueeze(-1))
        return h + self.mix(u)


class CNNSorter(Sorter):
    """1-D CNN over positions with global context in every block; length-agnostic.

    Args:
        channels: feature channels per position.
        num_blocks: residual blocks; block k uses dilation 2**k.
        kernel_size: odd convolution width.
    """

    kind = "cnn"

    def __init__(self, *, channels: int = 32, num_blocks: int = 4, kernel_size: int = 3):
        super().__init__(None, {"channels": channels, "num_blocks": num_blocks,
                                "kernel_size": kernel_size})
        self.embed = nn.Conv1d(1, channels, 1)
        self.blocks = nn.ModuleList(_Block(channels, kernel_size, 2**k)
                                    for k in range(num_blocks))
        self.head = nn.Conv1d(channels, 1, 1)

    def _rank(self, z: torch.Tensor) -> torch.Tensor:
        h = self.embed(z.unsqueeze(1))                        # (B, C, N)
        for block in self.blocks:
            h = block(h)
        return torch.sigmoid(self.head(F.gelu(h)).squeeze(1))  # (B, N)
