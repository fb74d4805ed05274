"""Sorters shipped inside the package (``rankcore/sorters/pretrained/NAME.safetensors``).

They were produced by our own flow (``brainrank pretrain-sorter``); the exact commands and
their measured accuracy are in ``rankcore/sorters/pretrained/README.md``, and each file's card
records its training config and validation metrics. A user needs no pretraining to train a
brain-age model with a learned-sorter ranking loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rankcore.errors import InputError
from rankcore.sorters.base import Sorter
from rankcore.sorters.checkpoint import load_sorter

__all__ = ["PRETRAINED_DIR", "list_pretrained", "load_pretrained", "pretrained_path"]

#: Folder of the shipped sorter files (package data).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def list_pretrained() -> list[str]:
    """Names of the shipped sorters, sorted (``["lstm16", "lstm32", "lstm64", "pairwise"]``)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors"))


def pretrained_path(name: str) -> Path:
    """Path of the shipped sorter ``name``.

    Raises:
        InputError: no shipped sorter has that name (the message lists them).
    """
    names = list_pretrained()
    if not isinstance(name, str) or name not in names:
        raise InputError(f"`name` must be one of the shipped sorters "
                         f"({', '.join(names) or 'none shipped'}), got {name!r}")
    return PRETRAINED_DIR / f"{name}.safetensors"


def load_pretrained(name: str, seq_len: int | None = None,
                    map_location: str | torch.device = "cpu") -> Sorter:
    """Load the shipped sorter ``name`` (eval mode, card as ``sorter.card``).

    Args:
        name: one of :func:`list_pretrained`.
        seq_len: the length the caller will feed (checked against fixed-length sorters).
        map_location: device to put the sorter on.

    Raises:
        InputError: unknown name.
        SorterLengthError: ``seq_len`` differs from a fixed-length sorter's length.
    """
    return load_sorter(pretrained_path(name), seq_len=seq_len, map_location=map_location)
