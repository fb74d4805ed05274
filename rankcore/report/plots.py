"""The report's figures as PNG files (matplotlib's Agg canvas; no display, no pyplot state).

* :func:`plot_pred_vs_age` — predicted against chronological age, with the identity line;
* :func:`plot_gap_vs_age` — the brain-age gap against age before and after bias correction,
  each with its least-squares line;
* :func:`plot_site_boxes` — the gap per site as box plots.

Each function writes its file atomically (temporary file + rename) and returns its path.
Ages are in years; subjects with an unknown (NaN) age are left out of every figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankcore._io import atomic_write

__all__ = ["plot_gap_vs_age", "plot_pred_vs_age", "plot_site_boxes", "save_figure"]


def _figure(width: float, height: float) -> Any:
    # A bare Figure renders with the Agg canvas whatever backend the caller configured.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` through a temporary file in the same folder."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")


def _known(age: Any, *others: Any) -> list[np.ndarray]:
    a = np.asarray(age, dtype=np.float64)
    keep = np.isfinite(a)
    return [a[keep], *(np.asarray(o, dtype=np.float64)[keep] for o in others)]


def _fit_line(ax: Any, x: np.ndarray, y: np.ndarray, **style: Any) -> None:
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.array([x.min(), x.max()])
        ax.plot(xs, slope * xs + intercept, label=f"fit: slope {slope:.2f}", **style)


def plot_pred_vs_age(age: Any, pred: Any, path: str | Path, *, stage1: Any = None,
                     title: str = "predicted vs chronological age") -> Path:
    """Scatter of predicted (N,) against chronological (N,) ages with the identity line.

    Args:
        age, pred: years (N,); NaN ages are dropped.
        path: PNG to write.
        stage1: optional stage-1 estimates (N,), drawn as a second, fainter series.
        title: figure title.
    """
    fig = _figure(5.5, 5.0)
    ax = fig.subplots()
    if stage1 is not None:
        a, p, s = _known(age, pred, stage1)
        ax.scatter(a, s, s=14, alpha=0.35, color="tab:gray", label="stage 1")
    else:
        a, p = _known(age, pred)
    ax.scatter(a, p, s=18, alpha=0.8, color="tab:blue", label="cascade")
    values = np.concatenate([a, p]) if len(a) else np.array([0.0, 1.0])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=1,
            label="identity")
    _fit_line(ax, a, p, color="tab:blue", linestyle="--", linewidth=1)
    ax.set(xlabel="chronological age (years)", ylabel="predicted age (years)", title=title,
           xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gap_vs_age(age: Any, gap: Any, path: str | Path, *, corrected_gap: Any = None,
                    title: str = "brain-age gap vs age") -> Path:
    """The gap (N,) against age, and next to it the bias-corrected gap when given.

    Args:
        age, gap: years (N,); NaN ages are dropped.
        path: PNG to write.
        corrected_gap: the gap after correction (N,), or None (one panel).
        title: figure title.
    """
    panels = [("before correction", gap)]
    if corrected_gap is not None:
        panels.append(("after correction (fitted on validation)", corrected_gap))
    fig = _figure(5.0 * len(panels), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (name, values) in zip(axes, panels):
        a, g = _known(age, values)
        ax.scatter(a, g, s=16, alpha=0.8)
        ax.axhline(0.0, color="black", linewidth=1)
        _fit_line(ax, a, g, color="tab:red", linestyle="--", linewidth=1)
        ax.set(xlabel="chronological age (years)", title=name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("predicted − chronological age (years)")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_site_boxes(site: Sequence[str | None], gap: Any, path: str | Path, *,
                    title: str = "brain-age gap per site") -> Path:
    """Box plots of the gap (N,) per site (sorted by name; None is ``"n/a"``).

    Args:
        site: N site labels.
        gap: years (N,); NaN gaps (unknown ages) are dropped.
        path: PNG to write.
        title: figure title.
    """
    g = np.asarray(gap, dtype=np.float64)
    names = np.asarray(["n/a" if s is None else str(s) for s in site])
    keep = np.isfinite(g)
    labels = sorted(set(names[keep].tolist()))
    groups = [g[keep & (names == s)] for s in labels]
    fig = _figure(max(4.5, 1.1 * len(labels) + 2.0), 4.2)
    ax = fig.subplots()
    if groups:
        ax.boxplot(groups, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1),
                      [f"{s}\n(n={len(x)})" for s, x in zip(labels, groups)])
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set(xlabel="site", ylabel="predicted − chronological age (years)", title=title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
