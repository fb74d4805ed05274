"""The QC page of a report: what was ingested, subject by subject, largest brain-age gaps first.

``qc.html`` is one self-contained file (every image inline as a ``data:image/png`` URI, no
external URL, no script). It holds the quarantine table of the cache (who was set aside and
why) and, for every evaluated subject, a montage of the three mid-slices (sagittal, coronal,
axial; superior / anterior up) of the cached volume with the brain mask's outline in red, or,
when the cache holds tissue channels, the second channel (grey matter) tinted red. Subjects
are sorted by the absolute brain-age gap, largest first: the scans most worth a look (a failed
mask, a whole-head image, a wrong orientation) come first.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QC_FILE", "QCSubject", "montage", "render_qc"]

QC_FILE = "qc.html"
_ZOOM = 3  # display pixels per voxel


@dataclass(frozen=True)
class QCSubject:
    """One evaluated subject of the QC page (ages in years; NaN when unknown)."""

    key: str
    age: float
    predicted: float
    low: float = float("nan")
    high: float = float("nan")

    @property
    def gap(self) -> float:
        return self.predicted - self.age


def _planes(vol: np.ndarray) -> list[np.ndarray]:
    x, y, z = (s // 2 for s in vol.shape)
    return [np.rot90(vol[x, :, :]), np.rot90(vol[:, y, :]), np.rot90(vol[:, :, z])]


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def montage(volume: np.ndarray) -> np.ndarray:
    """RGB montage (H, W, 3) uint8 of a cached volume's three mid-slices.

    Args:
        volume: (X, Y, Z) z-scored intensity (0 outside the brain mask), or (C, X, Y, Z) with
            intensity first and a tissue probability map second.

    Returns:
        The three planes side by side, each scaled by :data:`_ZOOM`; the mask outline (or the
        tissue map) in red.
    """
    vol = np.asarray(volume, dtype=np.float32)
    tissue = vol[1] if vol.ndim == 4 and vol.shape[0] > 1 else None
    image = vol[0] if vol.ndim == 4 else vol
    inside = image[image != 0]
    lo, hi = np.percentile(inside, [1, 99]) if inside.size else (0.0, 1.0)
    tiles = []
    planes = zip(_planes(image), _planes(tissue) if tissue is not None else [None] * 3)
    for plane, tmap in planes:
        gray = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        if tmap is not None:
            alpha = np.clip(tmap, 0, 1)[..., None] * 0.5
            rgb = rgb * (1 - alpha) + alpha * np.array([1.0, 0.1, 0.1])
        else:
            rgb[_edge(plane != 0)] = (1.0, 0.15, 0.15)
        tiles.append(rgb)
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 2), (0, 0))) for t in tiles]
    out = np.concatenate(padded, axis=1)
    out = np.repeat(np.repeat(out, _ZOOM, axis=0), _ZOOM, axis=1)
    return (out * 255).round().astype(np.uint8)


def _png_uri(rgb: np.ndarray) -> str:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _years(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.1f}"


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:"
          "collapse}td,th{border:1px solid #bbb;padding:.2em .5em;text-align:left}"
          "figure{display:inline-block;margin:.5em;vertical-align:top}"
          "figcaption{font-size:.85em}img{image-rendering:pixelated}")


def render_qc(subjects: Sequence[QCSubject], volumes: Any, quarantine: Sequence[Mapping],
              out_file: str | Path, *, title: str, max_subjects: int = 500) -> Path:
    """Write the QC page (see the module docstring).

    Args:
        subjects: the evaluated subjects, in the order of ``volumes``.
        volumes: ``volumes(i)`` returns the cached volume of ``subjects[i]``.
        quarantine: rows with participant_id, source, category, message.
        out_file: the page to write.
        title: its title.
        max_subjects: montages drawn at most (largest gaps first); the rest are counted.

    Returns:
        ``out_file`` as a Path.
    """
    order = sorted(range(len(subjects)), key=lambda i: -abs(subjects[i].gap)
                   if np.isfinite(subjects[i].gap) else 0.0)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>",
             f"<h2>Set aside at ingest ({len(quarantine)})</h2>"]
    if quarantine:
        parts.append("<table><tr><th>participant_id</th><th>category</th><th>message</th>"
                     "<th>source</th></tr>")
        parts += [f"<tr><td>{esc(str(q.get('participant_id')))}</td><td>"
                  f"{esc(str(q.get('category')))}</td><td>{esc(str(q.get('message')))}</td>"
                  f"<td>{esc(str(q.get('source')))}</td></tr>" for q in quarantine]
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    shown = order[:max_subjects]
    parts.append(f"<h2>Subjects, largest brain-age gap first ({len(subjects)})</h2><p>Mid "
                 "sagittal, coronal and axial slices of the cached volume; red: the brain "
                 "mask's outline (or the grey-matter map). Look for masks that include the "
                 "skull, cut-off brains and wrong orientations.</p>")
    for i in shown:
        s = subjects[i]
        interval = "" if not np.isfinite(s.low) else \
            f" [{_years(s.low)}, {_years(s.high)}]"
        caption = (f"{esc(s.key)}: age {_years(s.age)}, predicted {_years(s.predicted)}"
                   f"{interval}, gap {_years(s.gap)}")
        parts.append(f"<figure><img alt='{esc(s.key)}' src='{_png_uri(montage(volumes(i)))}'>"
                     f"<figcaption>{caption}</figcaption></figure>")
    if len(order) > len(shown):
        parts.append(f"<p>{len(order) - len(shown)} more subject(s) not drawn "
                     f"(max_subjects {max_subjects}).</p>")
    parts.append("</body></html>\n")
    out = Path(out_file)
    out.write_text("".join(parts), encoding="utf-8")
    return out
