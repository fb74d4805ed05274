"""A permutation-equivariant, length-agnostic sorter built on learned pairwise comparisons.

SoDeep's target rank of x_i, (N + 1 − R_i)/N, equals exactly
``(1/N) Σ_j H(x_j − x_i) + 1/(2N)``, with H the step function and H(0) = 1/2 (the j = i term
and ties each count one half). This sorter learns a smooth step: for every pair it computes
g(z_j − z_i, (z_i + z_j)/2) with a small MLP g on the normalised values z, antisymmetrises it,

    s_ij = σ(g_ij − g_ji),     so s_ij + s_ji = 1 and s_ii = 1/2 exactly,

and predicts r_i = mean_j s_ij + 1/(2N). It is a learned generalisation of the pairwise-sigmoid
soft rank (which is the special case g = d/τ): it can represent ranks exactly (ties included:
tied pairs get exactly 1/2), the predictions always sum to the true total (N + 1)/2, and
nothing depends on the order of the elements or on N. Cost: O(N²·hidden) time and memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankcore.sorters.base import Sorter


class PairwiseSorter(Sorter):
    """Learned antisymmetric pairwise comparisons, averaged over the sequence.

    Args:
        hidden_size: width of the pairwise MLP.
        num_layers: hidden layers of the pairwise MLP (≥ 1).
        max_sharpness: the first layer's slopes on z_j − z_i start log-spaced in
            [1, max_sharpness] (in units of the sequence's standard deviation), so steps of
            many widths are available from the first step; untrained, the sorter is already
            a smooth pairwise soft rank.
    """

    kind = "pairwise"

    def __init__(self, *, hidden_size: int = 16, num_layers: int = 2, max_sharpness: int = 64):
        super().__init__(None, {"hidden_size": hidden_size, "num_layers": num_layers,
                                "max_sharpness": max_sharpness})
        layers: list[nn.Module] = [nn.Linear(2, hidden_size)]
        for _ in range(num_layers - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        layers += [nn.GELU(), nn.Linear(hidden_size, 1)]
        self.mlp = nn.Sequential(*layers)
        self._init_first_layer(max_sharpness)

    def _init_first_layer(self, max_sharpness: int) -> None:
        first = self.mlp[0]
        h = first.out_features
        with torch.no_grad():
            # slopes on the difference d: ±(log-spaced in [1, max_sharpness]); each unit's
            # break-point d = offset/|slope| lies within half its own width of 0, where the
            # step must be sharpest. Only the weights on the midpoint feature are random.
            magnitude = torch.linspace(0.0, math.log(max_sharpness), h).exp()
            sign = torch.where(torch.arange(h) % 2 == 0, 1.0, -1.0)
            offset = torch.linspace(0.5, -0.5, h)
            first.weight[:, 0] = sign * magnitude
            first.weight[:, 1].uniform_(-0.5, 0.5)
            first.bias.copy_(-sign * offset)

    def _rank(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[-1]
        zi = z.unsqueeze(-1)                                   # (B, N, 1): row i
        zj = z.unsqueeze(-2)                                   # (B, 1, N): column j
        feats = torch.stack(torch.broadcast_tensors(zj - zi, 0.5 * (zi + zj)), dim=-1)
        g = self.mlp(feats).squeeze(-1)                        # (B, N, N): g(z_j − z_i, mid)
        s = torch.sigmoid(g - g.transpose(-1, -2))             # s_ij + s_ji = 1, s_ii = 1/2
        return s.mean(dim=-1) + 0.5 / n
