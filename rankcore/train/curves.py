"""Training curves of a cascade run as one PNG (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_training_curves"]


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in history:
        v = m.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            xs.append(int(m["epoch"]) + 1)
            ys.append(float(v))
    return xs, ys


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                         path: str | Path, *, title: str = "cascade") -> Path:
    """Plot training loss and validation MAE per epoch of every job; write ``path`` atomically.

    Args:
        histories: job name (``fold-0`` …, ``stage1``, ``stage2``) -> the loop's per-epoch
            metrics (``epoch`` 0-based, ``train_total``, ``val_mae``, ``train_mae``).
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path``.
    """
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or a
    # display, whatever backend the caller configured.
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_mae = fig.subplots(1, 2)
    for job, history in histories.items():
        fold = job.startswith("fold-")
        style = {"linestyle": ":", "alpha": 0.6, "linewidth": 1.0} if fold else {"linewidth": 2}
        xs, ys = _series(history, "train_total")
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=job, **style)
        xs, ys = _series(history, "val_mae")
        if not xs:
            xs, ys = _series(history, "train_mae")
            job = f"{job} (train)"
        if xs:
            ax_mae.plot(xs, ys, marker="o", markersize=3, label=job, **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss (total)", title="training loss")
    if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax_loss.lines):
        ax_loss.set_yscale("log")
    ax_mae.set(xlabel="epoch", ylabel="MAE (years)", title="validation MAE")
    for ax in (ax_loss, ax_mae):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
