"""The sorter families by name, and ``build_sorter`` with its argument checks."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from rankcore.errors import InputError
from rankcore.sorters.base import Sorter
from rankcore.sorters.cnn import CNNSorter
from rankcore.sorters.pairwise import PairwiseSorter
from rankcore.sorters.recurrent import GRUSorter, LSTMSorter

#: kind → class. ``lstm`` is fixed-length; the others accept any N.
SORTERS: dict[str, type[Sorter]] = {
    cls.kind: cls for cls in (LSTMSorter, GRUSorter, CNNSorter, PairwiseSorter)
}
#: Every kind ``build_sorter`` accepts.
SORTER_KINDS = tuple(SORTERS)


def sorter_sizes(kind: str) -> dict[str, int]:
    """The size arguments of ``kind`` and their defaults."""
    cls = _sorter_class(kind)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _sorter_class(kind: str) -> type[Sorter]:
    if kind not in SORTERS:
        raise InputError(f"`kind` must be one of {', '.join(map(repr, SORTER_KINDS))}, "
                         f"got {kind!r}")
    return SORTERS[kind]


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def build_sorter(kind: str, seq_len: int | None = None, **sizes: Any) -> Sorter:
    """Build an untrained sorter.

    Args:
        kind: one of ``SORTER_KINDS``: ``"lstm"`` (BiLSTM + position-mixing head, fixed
            length, SoDeep's model), ``"gru"`` (BiGRU, length-agnostic), ``"cnn"`` (1-D CNN
            with global context, length-agnostic), ``"pairwise"`` (learned pairwise
            comparisons; permutation-equivariant and length-agnostic).
        seq_len: sequence length N; required for ``"lstm"``. Length-agnostic kinds accept it
            and ignore it (their ``seq_len`` attribute is None: they take any N).
        **sizes: size arguments of the family (see :func:`sorter_sizes`), positive integers.

    Returns:
        The sorter (train mode, float32, CPU).

    Raises:
        InputError: unknown kind, unknown or non-positive size, missing or bad seq_len.
    """
    cls = _sorter_class(kind)
    allowed = sorter_sizes(kind)
    unknown = sorted(set(sizes) - set(allowed))
    if unknown:
        raise InputError(f"`sizes` of a {kind!r} sorter must be among "
                         f"{', '.join(allowed)}, got unknown {', '.join(unknown)}")
    for name, value in sizes.items():
        if not _is_int(value) or value < 1:
            raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    if kind == "cnn" and int(sizes.get("kernel_size", allowed["kernel_size"])) % 2 == 0:
        raise InputError(f"`kernel_size` must be odd, got {sizes['kernel_size']!r}")
    sizes = {k: int(v) for k, v in sizes.items()}
    if cls.fixed_length:
        if seq_len is None:
            raise InputError(f"`seq_len` must be given for a {kind!r} sorter (it works at one "
                             "sequence length only), got None")
        if not _is_int(seq_len) or seq_len < 2:
            raise InputError(f"`seq_len` must be an integer >= 2, got {seq_len!r}")
        return cls(int(seq_len), **sizes)
    if seq_len is not None and (not _is_int(seq_len) or seq_len < 1):
        raise InputError(f"`seq_len` must be a positive integer or None, got {seq_len!r}")
    return cls(**sizes)
