"""The predictions table (one row per subject-session) and its atomic CSV / Parquet writer.

Columns, in order (ages in years; empty in CSV / null in Parquet where undefined)::

    participant_id, session, site, age, stage1_age, predicted_age, brain_age_gap,
    corrected_age, corrected_gap [, corrected_age_cole, corrected_gap_cole] [, extra...]

``brain_age_gap = predicted_age - age``; ``corrected_*`` use the Beheshti/Smith correction by
default, or Cole's form with ``method="cole"`` (Cole's form also in the ``*_cole`` columns
when asked); they are empty when no correction was applied, or the age is unknown (Cole's
corrected age needs no age: only its gap is then empty).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankcore._io import atomic_write
from rankcore.bias import BiasCorrection
from rankcore.errors import InputError, ShapeError

__all__ = ["PREDICTION_COLUMNS", "TABLE_FORMATS", "check_table_path", "predictions_table",
           "write_table"]

PREDICTION_COLUMNS = ("participant_id", "session", "site", "age", "stage1_age",
                      "predicted_age", "brain_age_gap", "corrected_age", "corrected_gap")
#: file suffix -> format written by :func:`write_table`.
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _floats(x: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (n,):
        raise ShapeError(f"`{name}` must have shape ({n},), got {arr.shape}")
    return arr


def _nullable(arr: np.ndarray) -> pa.Array:
    return pa.array(arr, type=pa.float64(), mask=~np.isfinite(arr))


def predictions_table(participant_id: Sequence[str], session: Sequence[str | None],
                      site: Sequence[str | None], age: Any, stage1: Any, predicted: Any, *,
                      correction: BiasCorrection | None = None, method: str = "beheshti",
                      cole: bool = False, extra: Mapping[str, Sequence[Any]] | None = None,
                      interval: Any = None) -> pa.Table:
    """Build the predictions table.

    Args:
        participant_id, session, site: N labels (None: unknown).
        age: (N,) chronological ages, NaN where unknown.
        stage1: (N,) stage-1 estimates; predicted: (N,) cascade estimates (years).
        correction: bias correction to fill ``corrected_*``.
        method: its form in ``corrected_*``: ``"beheshti"`` (Beheshti/Smith) or ``"cole"``.
        cole: also add Cole's form (``*_cole``; empty when its slope is not positive).
        extra: further columns appended as they are (N values each).
        interval: a :class:`rankcore.conformal.ConformalInterval` (the model card's): adds
            ``interval_low`` / ``interval_high`` (years) around ``predicted``.

    Returns:
        A pyarrow Table with :data:`PREDICTION_COLUMNS` (and the optional columns).
    """
    n = len(participant_id)
    if len(session) != n or len(site) != n:
        raise ShapeError(f"`session` and `site` must have {n} values, got {len(session)} and "
                         f"{len(site)}")
    a = _floats(age, "age", n)
    s1 = _floats(stage1, "stage1", n)
    p = _floats(predicted, "predicted", n)
    known = np.isfinite(a)
    corrected = np.full(n, np.nan)
    corrected_cole = np.full(n, np.nan)
    if correction is not None and method == "cole":
        # Cole's corrected age does not use the age: apply it to every row.
        corrected = correction.apply(p, np.where(known, a, 0.0), "cole")
    elif correction is not None and known.any():
        corrected[known] = correction.apply(p[known], a[known], method)
    if correction is not None and cole and correction.cole_defined:
        corrected_cole = correction.apply(p, np.where(known, a, 0.0), "cole")
    columns: dict[str, pa.Array] = {
        "participant_id": pa.array([str(x) for x in participant_id], pa.string()),
        "session": pa.array(list(session), pa.string()),
        "site": pa.array(list(site), pa.string()),
        "age": _nullable(a),
        "stage1_age": _nullable(s1),
        "predicted_age": _nullable(p),
        "brain_age_gap": _nullable(p - a),
        "corrected_age": _nullable(corrected),
        "corrected_gap": _nullable(corrected - a),
    }
    if interval is not None:
        low, high = interval.bounds(p)
        columns["interval_low"], columns["interval_high"] = _nullable(low), _nullable(high)
    if cole:
        columns["corrected_age_cole"] = _nullable(corrected_cole)
        columns["corrected_gap_cole"] = _nullable(corrected_cole - a)
    for name, values in (extra or {}).items():
        if name in columns:
            raise InputError(f"`extra` must not repeat a predictions column, got {name!r}")
        if len(values) != n:
            raise ShapeError(f"`extra[{name!r}]` must have {n} values, got {len(values)}")
        columns[name] = pa.array(list(values))
    return pa.table(columns)


def check_table_path(path: str | Path, name: str = "out") -> str:
    """The format (``"csv"`` or ``"parquet"``) of ``path`` by its suffix; InputError otherwise."""
    suffix = Path(path).suffix.lower()
    fmt = TABLE_FORMATS.get(suffix)
    if fmt is None:
        raise InputError(f"`{name}` must end in {', '.join(TABLE_FORMATS)} (the format is "
                         f"chosen by the extension), got {str(path)!r}")
    return fmt


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def _write_csv(table: pa.Table, path: Path) -> None:
    """Plain CSV (header unquoted, empty cells for nulls, floats with 6 decimals)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow([_cell(v) for v in row.values()])


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as CSV or Parquet (by suffix) through a temporary file + rename.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: an unknown suffix.
    """
    path = Path(path)
    fmt = check_table_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        if fmt == "csv":
            _write_csv(table, tmp)
        else:
            pq.write_table(table, tmp, compression="zstd")

    return atomic_write(path, write)
