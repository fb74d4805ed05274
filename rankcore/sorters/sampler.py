"""Synthetic sequences to pretrain and evaluate learned sorters, with tie-aware targets.

SoDeep (Engilberge et al., CVPR 2019) pretrains its sorter on fresh synthetic sequences drawn
from a mix of distributions (uniform, normal, evenly spaced ranges shuffled, mixtures), with no
ties. Brain ages are full of ties (integer or half-year ages), and a regressor feeds the sorter
raw years, so this sampler adds generators with ties (age-like, integer-valued, repeated
values), random rounding / duplication of continuous values, and random affine rescaling from
tiny to large scales. Targets are the tie-aware SoDeep ranks ``get_tiedrank`` of the final
values (after the cast to the requested dtype), so a label always matches what a sorter sees.

Randomness is explicit and replayable: batch ``step`` of worker ``worker`` is a pure function of
``(seed, worker, step)``, so a resumed or restarted worker continues its own stream exactly and
different workers draw independent streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from rankcore.errors import InputError
from rankcore.ranks import get_tiedrank

#: Every generator family, in a fixed order (the order keys seeded draws: append, never reorder).
FAMILIES = ("uniform", "normal", "range", "mixture", "heavy", "age", "integer", "repeated")
#: Families of real-valued draws: tie-free unless ties are injected.
CONTINUOUS_FAMILIES = ("uniform", "normal", "range", "mixture", "heavy")
#: Families whose draws usually hold ties by construction.
TIED_FAMILIES = ("age", "integer", "repeated")

_AFFINE_LOG10_SCALE = (-3.0, 3.0)   # scale factor 1e-3 ... 1e3
_AFFINE_MAX_SHIFT = 10.0            # shift up to ±10 × scale (float32 keeps ~1e-6 of the spread)


def make_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU torch.Generator seeded from ``seed`` and an integer key path (independent streams).

    Uses numpy's SeedSequence so that nearby seeds and keys give unrelated streams.
    """
    state = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))
    return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))


def _u(gen: torch.Generator, rows: int, lo: float, hi: float, cols: int = 1) -> torch.Tensor:
    """(rows, cols) float64 uniform on [lo, hi)."""
    return torch.rand(rows, cols, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _randint(gen: torch.Generator, rows: int, lo: int, hi: torch.Tensor | int) -> torch.Tensor:
    """(rows, 1) int64 uniform on [lo, hi) (``hi`` may be a (rows, 1) tensor)."""
    return (lo + (torch.rand(rows, 1, generator=gen, dtype=torch.float64) * (hi - lo))).long()


def _draw_age(gen: torch.Generator, rows: int, n: int, round_ages: bool) -> torch.Tensor:
    """Ages in years in [18, 90]: uniform, unimodal or young+old bimodal cohorts per row.

    With ``round_ages`` each row is rounded to whole years (60 %) or half years (40 %), as
    cohort tables give them; otherwise rows are rounded to 0.1 y (30 %) or not at all.
    """
    kind = _randint(gen, rows, 0, 3)
    uni = _u(gen, rows, 18.0, 90.0, n)
    centre, spread = _u(gen, rows, 25.0, 75.0), _u(gen, rows, 3.0, 15.0)
    unimodal = centre + spread * torch.randn(rows, n, generator=gen, dtype=torch.float64)
    old = torch.rand(rows, n, generator=gen, dtype=torch.float64) < _u(gen, rows, 0.2, 0.8)
    bimodal = torch.where(old, _u(gen, rows, 55.0, 90.0, n), _u(gen, rows, 18.0, 35.0, n))
    ages = torch.where(kind == 0, uni, torch.where(kind == 1, unimodal, bimodal))
    ages = ages.clamp(18.0, 90.0)
    coin = torch.rand(rows, 1, generator=gen, dtype=torch.float64)
    if round_ages:
        step = torch.where(coin < 0.6, 1.0, 0.5)
    else:
        step = torch.where(coin < 0.3, 0.1, 0.0)
    return torch.where(step > 0, torch.round(ages / step.clamp_min(1e-12)) * step, ages)


def draw_family(family: str, gen: torch.Generator, rows: int, n: int, *,
                round_ages: bool = True) -> torch.Tensor:
    """Draw ``rows`` raw sequences of length ``n`` from one generator family (float64).

    Args:
        family: one of :data:`FAMILIES`.
        gen: the CPU generator every random number comes from.
        rows: number of sequences.
        n: sequence length.
        round_ages: for ``"age"``: round to whole or half years (ties) or keep (almost) exact.

    Returns:
        (rows, n) float64 tensor on the CPU.
    """
    f64 = torch.float64
    if family == "uniform":
        return torch.rand(rows, n, generator=gen, dtype=f64)
    if family == "normal":
        return torch.randn(rows, n, generator=gen, dtype=f64)
    if family == "range":  # evenly spaced values, shuffled (SoDeep's ranges)
        start, step = _u(gen, rows, -5.0, 5.0), _u(gen, rows, 0.01, 1.0)
        order = torch.rand(rows, n, generator=gen, dtype=f64).argsort(dim=-1)
        return start + step * order.to(f64)
    if family == "mixture":  # 1-4 normal components with their own centres and spreads
        k = 4
        centres = _u(gen, rows, -5.0, 5.0, k)
        spreads = 10.0 ** _u(gen, rows, -1.5, 0.3, k)
        n_comp = _randint(gen, rows, 1, k + 1)
        comp = (torch.rand(rows, n, generator=gen, dtype=f64) * n_comp).long()
        noise = torch.randn(rows, n, generator=gen, dtype=f64)
        return centres.gather(1, comp) + spreads.gather(1, comp) * noise
    if family == "heavy":  # skewed, heavy-tailed: lognormal with a random sign
        sigma = _u(gen, rows, 0.5, 2.5)
        sign = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, -1.0, 1.0).to(f64)
        return sign * torch.exp(sigma * torch.randn(rows, n, generator=gen, dtype=f64))
    if family == "age":
        return _draw_age(gen, rows, n, round_ages)
    if family == "integer":  # integers in [0, K), K from 2 to 2N: from heavy to light ties
        high = _randint(gen, rows, 2, 2 * n + 1)
        return (torch.rand(rows, n, generator=gen, dtype=f64) * high).floor()
    if family == "repeated":  # k distinct values (k = 1 gives a constant sequence)
        k = _randint(gen, rows, 1, max(n // 2, 1) + 1)
        values = torch.randn(rows, n, generator=gen, dtype=f64)
        pick = (torch.rand(rows, n, generator=gen, dtype=f64) * k).long()
        return values.gather(1, pick)
    raise InputError(f"`family` must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}")


def inject_ties(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Give each row ties: quantise it (half the rows) or copy some values onto others.

    Args:
        x: (rows, n) float64 raw sequences.
        gen: CPU generator.

    Returns:
        (rows, n) float64. Quantised rows (quantum 2 %–50 % of the row's standard deviation)
        and duplicated rows (each value replaced by another position's with probability
        1/n–1/2) almost always hold ties; :func:`ensure_ties` makes it certain.
    """
    rows, n = x.shape
    if n < 2:
        return x
    quantise = torch.rand(rows, 1, generator=gen) < 0.5
    quantum = x.std(dim=-1, keepdim=True).clamp_min(1e-12) * _u(gen, rows, 0.02, 0.5)
    quantised = torch.round(x / quantum) * quantum
    # duplicate: each position copies a random other position with probability p in [1/n, 0.5]
    p = _u(gen, rows, 1.0 / n, 0.5)
    copy = torch.rand(rows, n, generator=gen, dtype=torch.float64) < p
    src = (torch.rand(rows, n, generator=gen, dtype=torch.float64) * n).long()
    duplicated = torch.where(copy, x.gather(1, src), x)
    return torch.where(quantise, quantised, duplicated)


def has_ties(x: torch.Tensor) -> torch.Tensor:
    """(...,) bool: whether each sequence along the last dim holds two equal values."""
    s = x.sort(dim=-1).values
    return (s[..., 1:] == s[..., :-1]).any(dim=-1)


def ensure_ties(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Copy one random position's value onto another random position in rows without ties.

    Args:
        x: (rows, n) tensor with n ≥ 2.
        gen: CPU generator.

    Returns:
        (rows, n) tensor in which every row holds at least one tie.
    """
    rows, n = x.shape
    a = (torch.rand(rows, generator=gen) * n).long()
    b = (a + 1 + (torch.rand(rows, generator=gen) * (n - 1)).long()) % n
    need = ~has_ties(x)
    out = x.clone()
    r = torch.arange(rows)
    out[r[need], b[need]] = x[r[need], a[need]]
    return out


def random_affine(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """With probability ``prob`` per row, map x to a·x + b (a log-uniform in [1e-3, 1e3], b
    uniform in ±10·a), so raw scales run from tiny to large. Equal values stay exactly equal.

    Args:
        x: (rows, n) float64.
        gen: CPU generator.
        prob: probability per row.
    """
    rows = x.shape[0]
    apply = torch.rand(rows, 1, generator=gen) < prob
    a = 10.0 ** _u(gen, rows, *_AFFINE_LOG10_SCALE)
    b = _u(gen, rows, -_AFFINE_MAX_SHIFT, _AFFINE_MAX_SHIFT) * a
    return torch.where(apply, a * x + b, x)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InputError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"`{name}` must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise InputError(f"`{name}` must be a probability in [0, 1], got {value!r}")
    return v


def _family_weights(families: Sequence[str] | Mapping[str, float] | None) -> torch.Tensor:
    """Weights over :data:`FAMILIES` (uniform over the named ones)."""
    if families is None:
        chosen = dict.fromkeys(FAMILIES, 1.0)
    elif isinstance(families, Mapping):
        chosen = {str(k): float(v) for k, v in families.items()}
    elif isinstance(families, str):
        chosen = {families: 1.0}
    else:
        chosen = dict.fromkeys(map(str, families), 1.0)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise InputError(f"`families` must name families among {', '.join(FAMILIES)}, "
                         f"got unknown {', '.join(map(repr, unknown))}")
    w = torch.tensor([chosen.get(f, 0.0) for f in FAMILIES], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise InputError(f"`families` weights must be >= 0 with a positive sum, got {chosen}")
    return w


class SequenceSampler:
    """Batches of synthetic sequences (B, N) and their tie-aware SoDeep target ranks.

    Each row draws its own generator family; continuous rows get ties injected with
    probability ``tie_prob``; rows are then rescaled and shifted with probability
    ``affine_prob``. Batch ``step`` is a pure function of ``(seed, worker, step)``.

    Args:
        seed: base seed of the stream.
        seq_len: the sequence length N, or several lengths to draw one from per batch (for
            length-agnostic training; every row of one batch has the same N).
        batch_size: rows B per batch.
        worker: stream index; workers with different indices draw independent batches.
        families: which families to draw (names, or name → weight); all by default.
        tie_prob: probability that a continuous row gets ties injected.
        affine_prob: probability that a row is rescaled (×1e-3 … ×1e3) and shifted.
        dtype: floating dtype of the returned tensors (targets are computed after the cast).
        device: where the returned tensors live (drawn on the CPU, then moved).

    Example:
        >>> sampler = SequenceSampler(seed=0, seq_len=32, batch_size=64)
        >>> x, target = sampler.batch(0)          # (64, 32) each
        >>> for step, (x, target) in zip(range(100), sampler): ...
    """

    def __init__(self, seed: int, seq_len: int | Sequence[int], batch_size: int, *,
                 worker: int = 0, families: Sequence[str] | Mapping[str, float] | None = None,
                 tie_prob: float = 0.5, affine_prob: float = 0.75,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.seed = _check_int(seed, "seed", 0)
        lens = (seq_len,) if isinstance(seq_len, int | np.integer) else tuple(seq_len)
        if not lens:
            raise InputError("`seq_len` must be a length or a non-empty list of lengths, got []")
        self.seq_lens = tuple(_check_int(n, "seq_len", 1) for n in lens)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.worker = _check_int(worker, "worker", 0)
        self.weights = _family_weights(families)
        self.tie_prob = _check_prob(tie_prob, "tie_prob")
        self.affine_prob = _check_prob(affine_prob, "affine_prob")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"`dtype` must be a floating torch dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return batch number ``step`` of this worker's stream.

        Returns:
            ``(x, target)``, both (batch_size, N): raw values, and their tie-aware ranks
            ``get_tiedrank(x, dim=-1)`` = (N + 1 − R)/N in [1/N, 1].
        """
        step = _check_int(step, "step", 0)
        gen = make_generator(self.seed, self.worker, step)
        pick = int(torch.randint(len(self.seq_lens), (1,), generator=gen))
        n, rows = self.seq_lens[pick], self.batch_size
        fam = torch.multinomial(self.weights, rows, replacement=True, generator=gen)
        x = torch.empty(rows, n, dtype=torch.float64)
        for k, name in enumerate(FAMILIES):
            idx = (fam == k).nonzero().squeeze(-1)
            if idx.numel():
                x[idx] = draw_family(name, gen, idx.numel(), n)
        continuous = torch.tensor([f in CONTINUOUS_FAMILIES for f in FAMILIES])[fam]
        tie = (torch.rand(rows, generator=gen) < self.tie_prob) & continuous
        tied = inject_ties(x, gen)
        x = torch.where(tie.unsqueeze(-1), tied, x)
        x = random_affine(x, gen, self.affine_prob).to(self.dtype)
        return x.to(self.device), get_tiedrank(x, dim=-1).to(self.device)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches ``start, start + 1, ...`` forever (resume a stream at ``start``)."""
        step = _check_int(start, "start", 0)
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)
