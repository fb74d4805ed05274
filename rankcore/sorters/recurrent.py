"""Recurrent sorters of SoDeep (Engilberge et al., CVPR 2019): a fixed-length BiLSTM and a
length-agnostic BiGRU.
"""

from __future__ import annotations

import torch
from torch import nn

from rankcore.sorters.base import Sorter


class LSTMSorter(Sorter):
    """Bidirectional LSTM followed by a head that mixes all positions (SoDeep's best model).

    Because the head is a dense layer over all N positions, the sorter works at one sequence
    length only (``seq_len``); any other length raises SorterLengthError.

    Args:
        seq_len: the sequence length N the sorter is built for (≥ 2).
        hidden_size: LSTM hidden units per direction.
        num_layers: stacked LSTM layers.
        head_dim: features per position fed to the mixing layer (its input is N·head_dim).
    """

    kind = "lstm"
    fixed_length = True

    def __init__(self, seq_len: int, *, hidden_size: int = 64, num_layers: int = 2,
                 head_dim: int = 8):
        super().__init__(seq_len, {"hidden_size": hidden_size, "num_layers": num_layers,
                                   "head_dim": head_dim})
        self.rnn = nn.LSTM(1, hidden_size, num_layers=num_layers, batch_first=True,
                           bidirectional=True)
        self.proj = nn.Linear(2 * hidden_size, head_dim)
        self.mix = nn.Linear(seq_len * head_dim, seq_len)

    def _rank(self, z: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(z.unsqueeze(-1))                      # (B, N, 2H)
        f = torch.relu(self.proj(h)).flatten(1)               # (B, N·head_dim)
        return torch.sigmoid(self.mix(f))                     # (B, N)


class GRUSorter(Sorter):
    """Bidirectional GRU with a per-position head; directions summed; length-agnostic.

    Output is a sigmoid, so predictions lie in (0, 1) whatever N is.

    Args:
        hidden_size: GRU hidden units per direction.
        num_layers: stacked GRU layers.
    """

    kind = "gru"

    def __init__(self, *, hidden_size: int = 64, num_layers: int = 2):
        super().__init__(None, {"hidden_size": hidden_size, "num_layers": num_layers})
        self.rnn = nn.GRU(1, hidden_size, num_layers=num_layers, batch_first=True,
                          bidirectional=True)
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                  nn.Linear(hidden_size, 1))

    def _rank(self, z: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(z.unsqueeze(-1))                      # (B, N, 2H)
        h = h.unflatten(-1, (2, -1)).sum(dim=-2)              # (B, N, H): directions summed
        return torch.sigmoid(self.head(h).squeeze(-1))        # (B, N)
