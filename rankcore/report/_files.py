"""Report-folder plumbing: refuse a foreign folder, swap a finished folder in, JSON-safe values.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from rankcore.errors import InputError

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse an out_dir that exists and is neither empty nor an earlier report."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"`out_dir` must be a folder, got the file {str(out_dir)!r}")
    if any(out_dir.iterdir()) and not (out_dir / METRICS_FILE).is_file():
        raise InputError(f"`out_dir` {str(out_dir)!r} is not empty and holds no earlier report "
                         "(metrics.json): choose another folder")


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` onto ``out_dir`` (replacing an earlier report)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_curves(model_dir: Path, card: dict[str, Any], tmp: Path) -> bool:
    src = model_dir / card.get("files", {}).get("curves", CURVES_FILE)
    if src.is_file():
        shutil.copyfile(src, tmp / CURVES_FILE)
        return True
    stages = card.get("stages")
    if isinstance(stages, dict) and stages:
        from rankcore.train.curves import plot_training_curves

        plot_training_curves({j: s.get("history", []) for j, s in stages.items()},
                             tmp / CURVES_FILE, title=f"cascade {model_dir.name}")
        return True
    return False


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
