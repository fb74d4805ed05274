"""Render an evaluation report as Markdown and as one self-contained HTML file.

Both renderings come from the same list of blocks (:func:`report_blocks`), so they say the
same thing. The Markdown links the PNG files that sit next to it; the HTML embeds them as
base64 ``data:`` URIs and carries its own CSS: it references nothing outside itself (no
external URL, no relative file), so it can be mailed or archived alone.

SRCC comes first in every table: the project's models are trained to rank subjects by age.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Block", "Figure", "metrics_rows", "render_html", "render_markdown",
           "report_blocks"]

#: Metric rows of the tables, SRCC first, with their display names and units.
ROWS = (("srcc", "SRCC (Spearman)", ""), ("pearson_r", "Pearson r", ""),
        ("mae", "MAE", " y"), ("rmse", "RMSE", " y"), ("r2", "R²", ""),
        ("mean_bias", "mean bias (pred − age)", " y"),
        ("gap_age_corr", "corr(gap, age)", ""))


@dataclass(frozen=True)
class Figure:
    """A PNG of the report: its file name (next to the report) and a caption."""

    file: str
    caption: str


@dataclass(frozen=True)
class Block:
    """One piece of the report.

    ``kind`` is ``"h1"``, ``"h2"``, ``"p"`` (``text``), ``"list"`` (``items``), ``"table"``
    (``header`` and ``rows`` of cell strings) or ``"figure"`` (``figure``).
    """

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    figure: Figure | None = None


def _f(x: Any, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{float(x):.{digits}f}{unit}"


def _ci(block: Mapping[str, Any], name: str) -> str:
    low, high = block.get("ci", {}).get(name, [None, None])
    if low is None or high is None:
        return "n/a"
    return f"[{low:.3f}, {high:.3f}]"


def _metric_table(columns: Sequence[tuple[str, Mapping[str, Any] | None]]) -> Block:
    header = ["metric"]
    for title, _ in columns:
        header += [title, "95 % CI"]
    rows = []
    for key, label, unit in ROWS:
        row = [label]
        for _, block in columns:
            if block is None:
                row += ["n/a", "n/a"]
            else:
                row += [_f(block.get(key), unit), _ci(block, key)]
        rows.append(tuple(row))
    n_row = ["n"]
    for _, block in columns:
        n_row += [str(block["n"]) if block else "0", ""]
    rows.append(tuple(n_row))
    return Block("table", header=tuple(header), rows=tuple(rows))


def report_blocks(metrics: Mapping[str, Any], figures: Sequence[Figure], *,
                  title: str, facts: Sequence[str] = ()) -> list[Block]:
    """The report's content.

    Args:
        metrics: the ``metrics.json`` dict of :func:`rankcore.report.build_metrics` (plus
            optional ``floor``).
        figures: the PNGs, in display order.
        title: the report's title.
        facts: lines listed under the title (model, cache, split, ...).
    """
    blocks = [Block("h1", title)]
    if facts:
        blocks.append(Block("list", items=tuple(facts)))
    blocks.append(Block("h2", "Accuracy (SRCC first)"))
    blocks.append(Block("p", "Cascade (final) and stage-1 estimates of the same subjects; "
                             "intervals are percentile bootstrap intervals over subjects."))
    blocks.append(_metric_table([("cascade", metrics), ("stage 1", metrics.get("stage1"))]))
    floor = metrics.get("floor")
    if floor:
        blocks.append(Block("p", f"Irreducible floor (simulated cohort): a perfect brain-age "
                                 f"model scores MAE {_f(floor.get('mae'), ' y', 2)} on these "
                                 f"{floor.get('n', 'n/a')} subjects (true brain age vs "
                                 f"chronological age; whole cohort "
                                 f"{_f(floor.get('cohort_mae'), ' y', 2)})."))

    iv = metrics.get("interval")
    if iv:
        blocks.append(Block("h2", "Prediction interval"))
        blocks.append(Block("p", (
            f"Every estimate comes with a {100 * iv['level']:.0f} % split-conformal interval "
            f"(columns interval_low / interval_high), calibrated on {iv['n_calibration']} "
            f"validation subjects and wider for older estimates. On these {iv['n']} subjects it "
            f"covered {_f(iv['coverage'] and 100 * iv['coverage'], ' %', 1)} of the true ages "
            f"(nominal {100 * iv['level']:.0f} %); mean width {_f(iv['mean_width'], ' y', 1)}."
            + ("" if iv.get("exact", True) else " Too few calibration subjects for the "
               "guarantee: the largest validation score was used."))))

    blocks.append(Block("h2", "Age-bias correction"))
    bc = metrics.get("bias_corrected") or {}
    if bc.get("available"):
        c = bc["coefficients"]
        blocks.append(Block("p", (
            f"Fitted on the {bc['fitted_on']} split ({bc['n_fit']} subjects), never on the "
            f"evaluated one. Beheshti/Smith: gap = {c['alpha']:.4f} · age + {c['beta']:.3f}; "
            f"Cole: pred = {c['a']:.4f} · age + {c['b']:.3f}. Corrected metrics use the true "
            "age and flatter a model: read them next to the uncorrected ones.")))
        blocks.append(_metric_table([("uncorrected", metrics), ("Beheshti/Smith", bc["beheshti"]),
                                     ("Cole", bc.get("cole"))]))
        if bc.get("cole") is None and bc.get("cole_reason"):
            blocks.append(Block("p", f"Cole's form not applied: {bc['cole_reason']}."))
    else:
        blocks.append(Block("p", f"Not available: {bc.get('reason', 'no correction')}."))

    sites = metrics.get("per_site") or {}
    if sites:
        blocks.append(Block("h2", "Per site"))
        rows = tuple((name, str(b["n"]), _f(b.get("srcc")), _f(b.get("mae"), " y"),
                      _ci(b, "mae"), _f(b.get("mean_bias"), " y"),
                      _f(b.get("stage1_mae"), " y")) for name, b in sites.items())
        blocks.append(Block("table", header=("site", "n", "SRCC", "MAE", "MAE 95 % CI",
                                             "mean bias", "stage-1 MAE"), rows=rows))
    if figures:
        blocks.append(Block("h2", "Figures"))
        blocks += [Block("figure", figure=f) for f in figures]
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown of the blocks; figures link their PNG by file name (relative)."""
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(map(_md_cell, b.header)) + " |",
                     "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "figure" and b.figure is not None:
            out.append(f"![{b.figure.caption}]({b.figure.file})\n\n*{b.figure.caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 90%; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(blocks: Sequence[Block], folder: str | Path) -> str:
    """A standalone HTML page of the blocks; figures are read from ``folder`` and embedded."""
    folder = Path(folder)
    esc = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "brainrank report")
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                           for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "figure" and b.figure is not None:
            body.append(f'<figure><img alt="{esc(b.figure.caption)}" '
                        f'src="{_data_uri(folder / b.figure.file)}">'
                        f"<figcaption>{esc(b.figure.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def metrics_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per metric (SRCC first): cascade value and interval, stage 1, corrected values.

    For a table artifact: keys ``metric``, ``cascade``, ``ci_low``, ``ci_high``, ``stage1``,
    ``beheshti``, ``cole`` (None where undefined).
    """
    bc = metrics.get("bias_corrected") or {}
    beheshti = bc.get("beheshti") or {}
    cole = bc.get("cole") or {}
    stage1 = metrics.get("stage1") or {}
    rows = []
    for key, _, _ in ROWS:
        low, high = metrics.get("ci", {}).get(key, [None, None])
        rows.append({"metric": key, "cascade": metrics.get(key), "ci_low": low,
                     "ci_high": high, "stage1": stage1.get(key),
                     "beheshti": beheshti.get(key), "cole": cole.get(key)})
    return rows
