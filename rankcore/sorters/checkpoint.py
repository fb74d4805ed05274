"""Save and load sorters: safetensors weights with a JSON card, never pickle.

A sorter file ``NAME.safetensors`` holds the weights and, in its metadata under
``brainrank_card``, the card: what is needed to rebuild the sorter (kind, seq_len, sizes), its
rank convention, a SHA-256 digest of the weights, the library version, and whatever the caller
adds (training steps, seed, validation metrics, ...). The same card is written next to it as
``NAME.json`` for people and tools. Both files are written atomically (temporary file in the
same folder, then ``os.replace``), so a crash never leaves a half-written file under the name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rankcore._io import atomic_write
from rankcore.errors import CheckpointError, InputError, SorterLengthError
from rankcore.sorters.base import CONVENTION, Sorter
from rankcore.sorters.registry import SORTER_KINDS, build_sorter

#: Format tag of the card; bump when the card's meaning changes.
CARD_FORMAT = "brainrank-sorter/1"
#: safetensors metadata key that holds the card JSON.
METADATA_KEY = "brainrank_card"
#: Card fields written by save_sorter itself; a caller may not set them to other values.
CORE_FIELDS = ("format", "kind", "seq_len", "convention", "sizes", "weights_sha256",
               "library_version", "torch_version")
_SIDECAR_CHECKED = ("format", "kind", "seq_len", "convention", "sizes", "weights_sha256")


def _library_version() -> str:
    try:
        return importlib.metadata.version("brainrank")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.suffix != ".safetensors":
        raise InputError(f"`path` must end in .safetensors, got {str(path)!r}")
    return p


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` on a temporary file next to ``path``, then move it in place."""
    atomic_write(path, lambda tmp: write(str(tmp)))


def save_sorter(path: str | os.PathLike[str], sorter: Sorter,
                card: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a sorter to ``path`` (.safetensors, card embedded) and its card to ``path``.json.

    Args:
        path: destination ending in ``.safetensors``; missing parent folders are created.
        sorter: a sorter from :func:`build_sorter` (any device; weights are saved from the CPU).
        card: extra JSON-serialisable fields (training metrics, steps, seed, ...). They may
            not contradict the core fields save_sorter writes itself (``CORE_FIELDS``).

    Returns:
        The full card that was written.

    Raises:
        InputError: bad path, not a sorter, card not JSON-serialisable or contradicting a core
            field.
    """
    p = _check_path(path)
    if not isinstance(sorter, Sorter):
        raise InputError(f"`sorter` must be a rankcore sorter, got {type(sorter).__name__}")
    extra = dict(card or {})
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in sorter.state_dict().items()}
    core = {
        "format": CARD_FORMAT,
        "kind": sorter.kind,
        "seq_len": sorter.seq_len,
        "convention": sorter.convention,
        "sizes": dict(sorter.sizes),
        "weights_sha256": weights_digest(tensors),
        "library_version": _library_version(),
        "torch_version": torch.__version__,
    }
    clash = sorted(k for k in CORE_FIELDS if k in extra and extra[k] != core[k]
                   and k not in ("library_version", "torch_version"))
    if clash:
        raise InputError("`card` must not contradict the sorter's own fields, got "
                         + ", ".join(f"{k}={extra[k]!r} (sorter: {core[k]!r})" for k in clash))
    full = {**extra, **core}
    try:
        text = json.dumps(full, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"`card` must be JSON-serialisable (no NaN/inf), got: {err}") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    _atomic_write(_sidecar(p), lambda tmp: Path(tmp).write_text(text + "\n"))
    return full


def _read(p: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (card, tensors) from a sorter file; CheckpointError when unreadable."""
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"sorter file {str(p)!r} is not a readable safetensors file: "
                              f"{err}") from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"sorter file {str(p)!r} has no {METADATA_KEY!r} card in its "
                              "metadata; it was not written by save_sorter")
    try:
        card = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"sorter file {str(p)!r} has a corrupt card: {err}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"sorter file {str(p)!r} has a card that is not a JSON object")
    return card, tensors


def _validate_card(p: Path, card: dict[str, Any]) -> None:
    missing = [k for k in _SIDECAR_CHECKED if k not in card]
    if missing:
        raise CheckpointError(f"sorter card of {str(p)!r} lacks {', '.join(missing)}")
    if card["format"] != CARD_FORMAT:
        raise CheckpointError(f"sorter card of {str(p)!r} has format {card['format']!r}; this "
                              f"library reads {CARD_FORMAT!r}")
    if card["kind"] not in SORTER_KINDS:
        raise CheckpointError(f"sorter card of {str(p)!r} names kind {card['kind']!r}; known "
                              f"kinds are {', '.join(SORTER_KINDS)}")
    if card["convention"] != CONVENTION:
        raise CheckpointError(f"sorter card of {str(p)!r} uses rank convention "
                              f"{card['convention']!r}; this library expects {CONVENTION!r}")
    if not isinstance(card["sizes"], dict):
        raise CheckpointError(f"sorter card of {str(p)!r} has `sizes` that is not an object")
    sidecar = _sidecar(p)
    if sidecar.is_file():
        try:
            side = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"card file {str(sidecar)!r} is unreadable: {err}") from None
        differ = [k for k in _SIDECAR_CHECKED if not isinstance(side, dict)
                  or side.get(k) != card[k]]
        if differ:
            raise CheckpointError(f"card file {str(sidecar)!r} disagrees with the card inside "
                                  f"{str(p)!r} on {', '.join(differ)}; one of them was replaced")


def load_sorter(path: str | os.PathLike[str], seq_len: int | None = None,
                map_location: str | torch.device = "cpu") -> Sorter:
    """Rebuild a sorter written by :func:`save_sorter` (safetensors only; nothing unpickled).

    Args:
        path: the ``.safetensors`` file.
        seq_len: the sequence length the caller will feed; a fixed-length sorter built for
            another length raises SorterLengthError (length-agnostic sorters accept any).
        map_location: device to put the sorter on.

    Returns:
        The sorter in eval mode, with its card as ``sorter.card``.

    Raises:
        CheckpointError: missing, unreadable, corrupt or modified file; unknown kind; other
            rank convention; weights that do not fit the card.
        SorterLengthError: ``seq_len`` differs from a fixed-length sorter's length.
        InputError: bad ``path`` suffix, ``seq_len`` or ``map_location``.
    """
    p = _check_path(path)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or seq_len < 1):
        raise InputError(f"`seq_len` must be a positive integer or None, got {seq_len!r}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise InputError(f"`map_location` must name a torch device, got {map_location!r}") from None
    if not p.is_file():
        raise CheckpointError(f"sorter file {str(p)!r} does not exist")
    card, tensors = _read(p)
    _validate_card(p, card)
    try:
        sorter = build_sorter(card["kind"], seq_len=card["seq_len"], **card["sizes"])
    except InputError as err:
        raise CheckpointError(f"sorter card of {str(p)!r} cannot be built: {err}") from None
    expected = {k: tuple(v.shape) for k, v in sorter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise CheckpointError(f"weights in {str(p)!r} do not fit a {card['kind']!r} sorter with "
                              f"sizes {card['sizes']}: missing {missing}, unexpected {extra}, "
                              f"wrong shape {shapes}")
    if weights_digest(tensors) != card["weights_sha256"]:
        raise CheckpointError(f"weights in {str(p)!r} do not match the digest in their card: "
                              "the file was modified or corrupted")
    if seq_len is not None and sorter.seq_len is not None and seq_len != sorter.seq_len:
        raise SorterLengthError(
            f"sorter {str(p)!r} was trained for seq_len {sorter.seq_len}, got {seq_len} — "
            f"use a {card['kind']!r} sorter trained for {seq_len} or a length-agnostic kind "
            "(gru, cnn, pairwise)")
    sorter.load_state_dict(tensors)
    sorter.card = card
    return sorter.to(device).eval()
