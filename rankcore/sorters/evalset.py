"""A fixed, seeded evaluation suite for sorters: every family and length, with and without ties.

Each (family, N, ties) cell is a pure function of ``(seed, family index, N, ties)``, so adding
lengths or families never changes the other cells, and two runs with one seed compare the
same sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rankcore.errors import InputError
from rankcore.ranks import get_tiedrank
from rankcore.sorters.sampler import (
    CONTINUOUS_FAMILIES,
    FAMILIES,
    draw_family,
    ensure_ties,
    has_ties,
    inject_ties,
    make_generator,
    random_affine,
)

#: Key of the evaluation streams, apart from the training streams (worker ≥ 0, step ≥ 0).
_EVAL_KEY = 2**31 - 1


@dataclass(frozen=True)
class EvalBatch:
    """One cell of the evaluation suite.

    Attributes:
        family: generator family (see ``rankcore.sorters.sampler.FAMILIES``).
        seq_len: sequence length N.
        ties: True when every row holds at least one tie, False when no row holds any.
        x: (rows, N) values.
        target: (rows, N) tie-aware SoDeep ranks ``get_tiedrank(x, dim=-1)``.
    """

    family: str
    seq_len: int
    ties: bool
    x: torch.Tensor
    target: torch.Tensor


def _draw_cell(seed: int, family: str, n: int, ties: bool, rows: int,
               dtype: torch.dtype) -> torch.Tensor:
    gen = make_generator(seed, _EVAL_KEY, FAMILIES.index(family), n, int(ties))
    x = draw_family(family, gen, rows, n, round_ages=ties)
    if ties:
        if family in CONTINUOUS_FAMILIES:
            x = inject_ties(x, gen)
        x = random_affine(x, gen, prob=0.75).to(dtype)
        return ensure_ties(x, gen)
    x = random_affine(x, gen, prob=0.75).to(dtype)
    for _ in range(100):  # continuous draws almost never tie; redraw the rare rows that do
        bad = has_ties(x)
        if not bool(bad.any()):
            return x
        redraw = draw_family(family, gen, int(bad.sum()), n, round_ages=False)
        x[bad] = random_affine(redraw, gen, prob=0.75).to(dtype)
    raise InputError(f"cannot draw tie-free sequences of length {n} in {dtype} "
                     f"from family {family!r}")  # pragma: no cover


def fixed_eval_set(seed: int, seq_lens: Sequence[int] = (8, 16, 32, 64, 128, 256), *,
                   rows: int = 64, families: Sequence[str] | None = None,
                   dtype: torch.dtype = torch.float32) -> list[EvalBatch]:
    """Build the seeded evaluation suite.

    For every length and family: a tie-free cell (continuous families and unrounded ages) and
    a tied cell (every family; continuous rows get ties injected; every row holds a tie).
    Rows are rescaled and shifted as in training (75 % of rows).

    Args:
        seed: seed of the suite.
        seq_lens: lengths N (each ≥ 2).
        rows: sequences per cell.
        families: families to include (all of ``FAMILIES`` by default).
        dtype: floating dtype of x and target.

    Returns:
        A list of :class:`EvalBatch`, ordered by length, family, then ties (False first).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"`seed` must be an integer >= 0, got {seed!r}")
    lens = tuple(seq_lens)
    if not lens or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lens):
        raise InputError(f"`seq_lens` must be a non-empty list of integers >= 2, got {seq_lens!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise InputError(f"`rows` must be an integer >= 1, got {rows!r}")
    fams = FAMILIES if families is None else tuple(families)
    unknown = sorted(set(fams) - set(FAMILIES))
    if unknown or not fams:
        raise InputError(f"`families` must be a non-empty list among {', '.join(FAMILIES)}, "
                         f"got {families!r}")
    out = []
    for n in lens:
        for family in fams:
            tie_options = (False, True) if family in (*CONTINUOUS_FAMILIES, "age") else (True,)
            for ties in tie_options:
                x = _draw_cell(seed, family, n, ties, rows, dtype)
                out.append(EvalBatch(family, n, ties, x, get_tiedrank(x, dim=-1)))
    return out
