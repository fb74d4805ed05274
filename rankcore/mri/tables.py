"""Read the small tables a cohort comes with (.csv, .tsv, .parquet) and parse their cells.

Tables are read with the csv module (UTF-8, an optional BOM) or pyarrow; no pandas. Every
cell becomes text or None ("", "n/a", "na", "nan", "none", "null" in any case, a NaN or a
null are missing). Known column names match in any case; other columns are kept as written.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rankcore.errors import InputError

#: Cell texts that mean "no value" (compared lower-case, after stripping blanks).
MISSING_VALUES = frozenset({"", "n/a", "na", "nan", "none", "null"})
#: Values allowed in a `split` column.
SPLITS = ("train", "val", "test")
#: Ages at or above this many years are refused as not being ages in years.
MAX_AGE = 150.0

_CENSORED = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*\+\s*$")
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclass(frozen=True)
class Table:
    """A parsed table: where it came from, its column names, and its rows.

    Attributes:
        path: the file.
        columns: column names; known names (``known`` argument of :func:`read_table`) are
            lower-cased, others kept as written.
        rows: ``(where, cells)`` per data row: ``where`` names the row for messages
            ("/data/ds/participants.tsv line 4", "/data/m.parquet row 3"); ``cells`` maps
            column name to text, or None when missing.
    """

    path: Path
    columns: tuple[str, ...]
    rows: tuple[tuple[str, dict[str, str | None]], ...]


def _cell(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip()
    return None if text.lower() in MISSING_VALUES else text


def _columns(path: Path, header: list[str], known: tuple[str, ...]) -> tuple[str, ...]:
    names = []
    for raw in header:
        name = str(raw).strip()
        names.append(name.lower() if name.lower() in known else name)
    seen = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears more than once")
        if not name:
            raise InputError(f"{path}: the header has an empty column name")
        seen.add(name)
    return tuple(names)


def _read_delimited(path: Path, delimiter: str, known: tuple[str, ...]) -> Table:
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise InputError(f"{path}: the table is empty (no header row)")
        columns = _columns(path, header, known)
        for fields in reader:
            if not fields or all(not x.strip() for x in fields):
                continue
            where = f"{path} line {reader.line_num}"
            if len(fields) > len(columns) and any(x.strip() for x in fields[len(columns):]):
                raise InputError(f"{where} has {len(fields)} fields but the header has "
                                 f"{len(columns)} (wrong delimiter?)")
            cells = {c: _cell(fields[i]) if i < len(fields) else None
                     for i, c in enumerate(columns)}
            rows.append((where, cells))
    return Table(path, columns, tuple(rows))


def _read_parquet(path: Path, known: tuple[str, ...]) -> Table:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = _columns(path, table.column_names, known)
    rows = []
    for i, record in enumerate(table.to_pylist(), start=1):
        values = list(record.values())
        rows.append((f"{path} row {i}", {c: _cell(v) for c, v in zip(columns, values)}))
    return Table(path, columns, tuple(rows))


def read_table(path: Path, *, known: tuple[str, ...] = (),
               required: tuple[str, ...] = ()) -> Table:
    """Read a .csv, .tsv or .parquet table.

    Args:
        path: the file; its suffix chooses the format.
        known: column names matched in any case (stored lower-case).
        required: column names that must be present.

    Raises:
        InputError: the file cannot be read or parsed, has an unknown suffix, lacks a
            required column, or has duplicate column names. The message names the file.
    """
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = _read_delimited(path, ",", known)
        elif suffix == ".tsv":
            table = _read_delimited(path, "\t", known)
        elif suffix == ".parquet":
            table = _read_parquet(path, known)
        else:
            raise InputError(f"{path}: a table must be .csv, .tsv or .parquet, got "
                             f"{suffix or 'no suffix'!r}")
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read the table ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {', '.join(missing)}; found "
                         f"{', '.join(table.columns) or 'none'}")
    return table


def parse_age(text: str | None) -> tuple[float | None, bool, str | None]:
    """Parse an age cell.

    Returns:
        ``(age, censored, problem)``: ``age`` in years or None when missing; ``censored`` is
        True for BIDS top-coded ages such as "89+" (age 89.0); ``problem`` is a message when
        the text is not an age (not a number, negative, non-finite, or >= 150 years).
    """
    if text is None:
        return None, False, None
    censored = _CENSORED.match(text)
    try:
        age = float(censored.group(1) if censored else text)
    except ValueError:
        return None, False, f"age {text!r} is not a number"
    if not math.isfinite(age) or age < 0:
        return None, False, f"age {text!r} must be a finite number >= 0"
    if age >= MAX_AGE:
        return None, False, f"age {text!r} is not an age in years (>= {MAX_AGE:g})"
    return age, censored is not None, None


def parse_sex(text: str | None) -> str | None:
    """"M"/"F" for the usual spellings (m, male, f, female in any case); other text as given."""
    if text is None:
        return None
    return _SEX.get(text.lower(), text)


def parse_split(text: str | None, where: str) -> str | None:
    """A `split` cell: "train", "val" or "test" (any case) or None when missing.

    Raises:
        InputError: any other value; a typo in a split would silently move subjects between
            training and evaluation, so it stops the run instead of quarantining the row.
    """
    if text is None:
        return None
    value = text.lower()
    if value not in SPLITS:
        raise InputError(f"{where}: `split` must be one of {', '.join(SPLITS)}, got {text!r}")
    return value
