"""What every learned sorter shares: the rank convention, input checks and input normalisation.

A sorter maps a sequence of scores x (..., N) to its predicted ranks (..., N) in SoDeep's
convention ``sodeep_desc_norm``: the normalised descending rank (N + 1 − R)/N ∈ [1/N, 1], where R
is the ascending 1-based fractional rank (Engilberge et al., CVPR 2019). The largest value gets
1/N, the smallest 1, and tied values share their average.

Every sorter normalises its input inside ``forward`` from the sequence itself (shift to zero mean,
scale to unit standard deviation), so raw ages in years and the same ages z-scored give the same
output: a brain-age regressor can feed its predictions in years straight to the sorter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from rankcore._validate import check_finite
from rankcore.errors import InputError, ShapeError, SorterLengthError

#: The only rank convention the learned sorters produce (see the module docstring).
CONVENTION = "sodeep_desc_norm"

#: Relative floor of the per-sequence scale: a sequence whose spread is below this fraction of
#: its own largest deviation is treated as constant. Relative, so the floor scales with the
#: input and the normalisation stays exactly scale invariant.
_REL_EPS = 1e-6


def normalize_sequences(x: torch.Tensor) -> torch.Tensor:
    """Shift and scale each sequence along the last dim to zero mean and unit standard deviation.

    The shift and scale come from the sequence itself, so the result does not depend on the
    unit of ``x`` (years, z-scores, ...). The minimum is subtracted first (exactly, and without
    depending on the order of the elements), so constant sequences give exact zeros and a
    large common offset does not cost precision in the mean. The scale has a floor relative to
    the sequence's own spread plus the dtype's smallest normal number, which keeps constant
    sequences free of NaN in both the value and the gradient.

    Args:
        x: (..., N) floating tensor.

    Returns:
        (..., N) tensor of the same dtype: (x − mean)/std per sequence (population std).
    """
    x = x - x.amin(dim=-1, keepdim=True)
    centred = x - x.mean(dim=-1, keepdim=True)
    var = centred.square().mean(dim=-1, keepdim=True)
    ref = centred.abs().amax(dim=-1, keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    scale = torch.sqrt(var + (_REL_EPS * ref).square() + tiny)
    return centred / scale


class Sorter(nn.Module):
    """Base class of the learned sorters: input checks, normalisation, batch flattening.

    Subclasses set ``kind`` and implement ``_rank`` on a normalised (B, N) batch; ``forward``
    accepts any leading batch shape.

    Attributes:
        kind: family name, as accepted by :func:`rankcore.sorters.build_sorter`.
        seq_len: the one sequence length a fixed-length sorter accepts; None when the sorter
            accepts any length.
        convention: always ``"sodeep_desc_norm"``.
        sizes: the constructor's size arguments (recorded in the checkpoint card).
        card: the checkpoint card when the sorter came from :func:`load_sorter`, else None.
    """

    kind: ClassVar[str] = ""
    fixed_length: ClassVar[bool] = False
    convention: str = CONVENTION

    def __init__(self, seq_len: int | None, sizes: dict[str, Any]):
        super().__init__()
        self.seq_len = seq_len
        self.sizes = dict(sizes)
        self.card: dict[str, Any] | None = None

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, seq_len={self.seq_len}, sizes={self.sizes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict the ranks of each sequence along the last dim.

        Args:
            x: (..., N) scores in any unit; a (N,) input is one sequence.

        Returns:
            (..., N) predicted ranks in the ``sodeep_desc_norm`` convention (≈ (N + 1 − R)/N),
            in the sorter's parameter dtype.

        Raises:
            InputError: x is not a real tensor or holds NaN/inf.
            ShapeError: x is 0-d or has an empty last dim.
            SorterLengthError: a fixed-length sorter got another N.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(f"`x` must be a tensor, got {type(x).__name__}")
        if x.is_complex():
            raise InputError(f"`x` must be a real tensor, got dtype {x.dtype}")
        if x.ndim == 0:
            raise ShapeError("`x` must have shape (..., N), got a 0-d tensor")
        n = x.shape[-1]
        if n == 0:
            raise ShapeError(f"`x` must have a non-empty last dim, got shape {tuple(x.shape)}")
        if self.seq_len is not None and n != self.seq_len:
            raise SorterLengthError(
                f"this {self.kind!r} sorter was trained for seq_len {self.seq_len}, got a "
                f"sequence of length {n} (shape {tuple(x.shape)}); use a sorter trained for "
                f"{n} or a length-agnostic kind"
            )
        check_finite(x, "x")
        param = next(self.parameters())
        work = x if x.is_floating_point() else x.to(param.dtype)
        z = normalize_sequences(work).to(param.dtype)
        lead = x.shape[:-1]
        out = self._rank(z.reshape(-1, n))
        return out.reshape(*lead, n)

    def _rank(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Map normalised sequences (B, N) to predicted ranks (B, N)."""
        raise NotImplementedError
