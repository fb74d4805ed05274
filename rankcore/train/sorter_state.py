"""Checkpoints of a sorter pretraining run: one self-contained folder per checkpoint, no pickle.

Layout of ``checkpoint_dir``::

    step-0000200/
        sorter.safetensors      weights + card (rankcore.sorters.save_sorter) ; sorter.json
        optimizer.safetensors   Adam moments and step counters
        state.json              step, config, history, optimizer hyper-parameters
    step-0000400/ ...

A folder is written under a temporary name and renamed when complete, so a folder named
``step-*`` is always whole; the newest ``keep`` are kept. A folder is exactly what a Ray Train
checkpoint holds, so the in-process loop and the Ray workers share this code.

The finished run's sorter is copied out as one sorter file (:func:`write_sorter_file`), and a
rerun of the same configuration finds it again (:func:`finished_sorter`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankcore.errors import CheckpointError, InputError, TrainingError
from rankcore.sorters import Sorter, load_sorter, save_sorter
from rankcore.train.sorter_config import SorterTrainConfig

__all__ = ["SORTER_FILE", "finished_sorter", "latest_state", "read_state", "write_sorter_file",
           "write_state"]

SORTER_FILE = "sorter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_PREFIX = "step-"


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict → (tensors for safetensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def write_state(checkpoint_dir: str | Path, step: int, sorter: Sorter,
                optimizer: torch.optim.Optimizer, state: dict[str, Any], card: dict[str, Any],
                *, keep: int = 2) -> Path:
    """Write ``checkpoint_dir/step-NNNNNNN`` atomically; prune all but the newest ``keep``.

    Args:
        checkpoint_dir: parent folder (created).
        step: completed optimisation steps.
        sorter: the (unwrapped) sorter.
        optimizer: its optimizer.
        state: JSON-able run state (step, config, history, ...).
        card: extra card fields for the sorter file.
        keep: complete checkpoint folders to keep.

    Returns:
        The new folder.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_sorter(tmp / SORTER_FILE, sorter, card)
        tensors, meta = _optimizer_split(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizer": meta},
                                                 indent=1, sort_keys=True, allow_nan=True))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``checkpoint_dir``, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def read_state(folder: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Sorter, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder.

    Returns:
        ``(sorter, optimizer_state_dict, state)``: the sorter (train mode, on
        ``map_location``), the optimizer state dict for ``load_state_dict`` and the run state.

    Raises:
        CheckpointError: a file is missing or unreadable.
    """
    p = Path(folder)
    try:
        state = json.loads((p / STATE_FILE).read_text())
        tensors = load_file(str(p / OPTIMIZER_FILE), device=str(map_location))
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {str(p)!r} is unreadable: {err}") from None
    sorter = load_sorter(p / SORTER_FILE, map_location=map_location).train()
    return sorter, _optimizer_join(tensors, state.pop("optimizer")), state


def write_sorter_file(out: str | Path, checkpoint: str | Path,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the finished sorter of a checkpoint folder to ``out`` (.safetensors + .json).

    Args:
        out: destination sorter file.
        checkpoint: a checkpoint folder whose card says ``complete``.
        extra: card fields to add (engine, run name, ...).

    Returns:
        The card written.

    Raises:
        TrainingError: the checkpoint is not a finished run.
    """
    sorter = load_sorter(Path(checkpoint) / SORTER_FILE)
    card = dict(sorter.card or {})
    if not card.get("complete"):
        raise TrainingError(f"checkpoint {str(checkpoint)!r} is not a finished run")
    return save_sorter(out, sorter, {**card, **(extra or {})})


def finished_sorter(out: str | Path, config: SorterTrainConfig | dict[str, Any]
                    ) -> dict[str, Any] | None:
    """The card of ``out`` when it is a finished sorter of ``config`` (same digest), else None.

    Lets a rerun with the same configuration reuse the file instead of training again.
    """
    config = SorterTrainConfig.from_dict(config)
    p = Path(out)
    if not p.is_file():
        return None
    try:
        card = load_sorter(p).card or {}
    except InputError:
        return None
    if card.get("complete") and card.get("config_digest") == config.digest():
        return card
    return None
