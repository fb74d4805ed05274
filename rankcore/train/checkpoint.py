"""Checkpoints of a training stage: safetensors weights + JSON card, written atomically.

Layout of a stage's ``out_dir``::

    epoch-0007/            one complete epoch (written as a temporary folder, then renamed)
        model.safetensors      model weights and buffers
        optimizer.safetensors  optimizer tensors (Adam moments, steps)
        best.safetensors       weights of the best epoch so far (when it is not this one)
        card.json              config, epoch, metrics per epoch, optimizer/schedule state, ...
    latest.json            {"epoch": 7, "dir": "epoch-0007"} — replaced atomically
    model.safetensors      the final (best-epoch) weights        } written when the stage
    card.json              the final card (written last)         } finishes

Only the latest epoch folder is kept; it is self-contained (a Ray Train checkpoint is exactly
such a folder), so training resumes from it alone. A crash at any point leaves either the
previous state or the new one, never a half-written folder or file under its final name.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rankcore._io import atomic_write
from rankcore.errors import CheckpointError
from rankcore.models.backbone import AgeRegressor, BackboneConfig
from rankcore.models.cascade import CascadeConfig, CorrectionRegressor

__all__ = [
    "CARD_FORMAT",
    "bind_preprocess",
    "file_sha256",
    "latest_checkpoint",
    "library_versions",
    "load_stage_model",
    "read_checkpoint",
    "save_stage_model",
    "weights_digest",
    "weights_preprocess",
    "write_checkpoint",
]

CARD_FORMAT = "brainrank-stage/1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_FILE = "best.safetensors"
CARD_FILE = "card.json"
LATEST_FILE = "latest.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a trained model (recorded in every card)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for dist in ("brainrank", "safetensors", "scipy", "nibabel", "pyarrow", "pydantic",
                 "prefect", "ray"):  # metadata only: nothing is imported
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _json_dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def _atomic_file(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; remove the temporary on failure."""
    atomic_write(path, write)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            name = f"{pid}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def write_checkpoint(out_dir: Path, epoch: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, card: dict[str, Any],
                     best_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out_dir/epoch-NNNN`` atomically, point ``latest.json`` at it, prune old epochs.

    Args:
        out_dir: the stage folder (exists).
        epoch: 0-based epoch just finished.
        model: the (unwrapped) model.
        optimizer: its optimizer.
        card: JSON-able dict (config, metrics, schedule state, ...); ``epoch`` is added.
        best_state: weights of the best epoch when it is not this one (kept for resuming).

    Returns:
        The epoch folder.
    """
    final = out_dir / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".epoch-{epoch:04d}.", suffix=".tmp"))
    try:
        state = _state(model)
        save_file(state, str(tmp / MODEL_FILE))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        if best_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in best_state.items()},
                      str(tmp / BEST_FILE))
        full = dict(card, epoch=epoch, optimizer=opt_meta, weights_sha256=weights_digest(state))
        _json_dump(full, tmp / CARD_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_file(out_dir / LATEST_FILE,
                 lambda p: _json_dump({"epoch": epoch, "dir": final.name}, p))
    for old in out_dir.glob("epoch-*"):
        try:
            e = int(old.name.split("-", 1)[1])
        except ValueError:
            continue
        if e != epoch:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The epoch folder ``latest.json`` points to, or None when there is none."""
    pointer = Path(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{str(pointer)!r} is not a checkpoint pointer: {err}") from None
    path = Path(out_dir) / name
    if not (path / CARD_FILE).is_file():
        raise CheckpointError(f"{str(pointer)!r} points to {name!r}, which is incomplete")
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any],
                                         dict[str, torch.Tensor] | None]:
    """Read an epoch folder: (model state, optimizer state dict, card, best-epoch state or None).

    Raises:
        CheckpointError: missing or unreadable files, or weights that do not match the card.
    """
    path = Path(path)
    try:
        card = json.loads((path / CARD_FILE).read_text())
        state = load_file(str(path / MODEL_FILE))
        opt_tensors = load_file(str(path / OPTIMIZER_FILE))
        best = load_file(str(path / BEST_FILE)) if (path / BEST_FILE).is_file() else None
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err}") from None
    if weights_digest(state) != card.get("weights_sha256"):
        raise CheckpointError(f"weights in {str(path)!r} do not match their card's digest")
    return state, _optimizer_state(opt_tensors, card["optimizer"]), card, best


def save_stage_model(out_dir: Path, model: nn.Module, card: dict[str, Any]) -> None:
    """Write the finished stage: ``model.safetensors`` then ``card.json`` (each atomically)."""
    state = _state(model)
    full = dict(card, format=CARD_FORMAT, weights_sha256=weights_digest(state))
    _atomic_file(out_dir / MODEL_FILE, lambda p: save_file(state, str(p)))
    _atomic_file(out_dir / CARD_FILE, lambda p: _json_dump(full, p))


#: safetensors metadata keys binding a finished stage's weights to its preprocessing.
PREPROCESS_META = "brainrank.preprocess"
PREPROCESS_DIGEST_META = "brainrank.preprocess_digest"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def bind_preprocess(stage_dir: Path, preprocess: dict[str, Any], digest: str) -> None:
    """Record the preprocessing config in the metadata of ``stage_dir/model.safetensors``.

    The weights file then says itself which volumes it was trained on (``preprocess`` as
    JSON and its ``digest``), so a card describing another preprocessing is refused on load.
    The tensors are unchanged; the file is rewritten atomically.
    """
    path = Path(stage_dir) / MODEL_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"stage weights {str(path)!r} cannot be read: {err}") from None
    meta = {PREPROCESS_META: json.dumps(preprocess, sort_keys=True),
            PREPROCESS_DIGEST_META: str(digest)}
    _atomic_file(path, lambda p: save_file(state, str(p), metadata=meta))


def weights_preprocess(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str] | None:
    """The (preprocess config dict, digest) recorded in a weights file, or None if none is.

    Raises:
        CheckpointError: the file cannot be read, or its record is not JSON.
    """
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"stage weights {str(path)!r} cannot be read: {err}") from None
    if PREPROCESS_META not in meta:
        return None
    try:
        return json.loads(meta[PREPROCESS_META]), str(meta.get(PREPROCESS_DIGEST_META))
    except ValueError as err:
        raise CheckpointError(f"the preprocessing record in {str(path)!r} is corrupt: "
                              f"{err}") from None


def build_stage_model(stage: int, backbone: BackboneConfig,
                      cascade: CascadeConfig) -> AgeRegressor | CorrectionRegressor:
    """A fresh stage-1 (:class:`AgeRegressor`) or stage-2 (:class:`CorrectionRegressor`) model."""
    return AgeRegressor(backbone) if stage == 1 else CorrectionRegressor(backbone, cascade)


def load_stage_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
                     ) -> tuple[AgeRegressor | CorrectionRegressor, dict[str, Any]]:
    """Load a finished stage folder (or an epoch folder) written by the training loop.

    Returns:
        (model in eval mode, card).

    Raises:
        CheckpointError: missing or corrupt files, a foreign card, or weights that do not fit.
    """
    path = Path(path)
    try:
        card = json.loads((path / CARD_FILE).read_text())
        state = load_file(str(path / MODEL_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"stage model {str(path)!r} cannot be read: {err}") from None
    if card.get("stage") not in (1, 2) or "backbone" not in card:
        raise CheckpointError(f"{str(path / CARD_FILE)!r} is not a brainrank stage card")
    if weights_digest(state) != card.get("weights_sha256"):
        raise CheckpointError(f"weights in {str(path)!r} do not match their card's digest")
    model = build_stage_model(card["stage"], BackboneConfig.from_dict(card["backbone"]),
                              CascadeConfig.from_dict(card.get("cascade")))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {str(path)!r} do not fit the card's model: "
                              f"{err}") from None
    return model.to(map_location).eval(), card
