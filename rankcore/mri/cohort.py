"""Parse a cohort — a BIDS root or a manifest table — into rows and quarantine entries.

BIDS root (a folder): ``participants.tsv`` (``participant_id`` required; ``age``, ``sex``,
``site``, ``split`` optional, other columns kept in :attr:`CohortRow.extra`) and images at
``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``; each session with an image gives one row. Ids without
the "sub-" prefix in participants.tsv get it. A ``sub-X/sub-X_sessions.tsv`` with
``session_id`` and ``age`` columns gives per-session ages (they win over participants.tsv).
A session folder holding several T1w images (acq-/run- variants) keeps the first by name;
the others are quarantined as `duplicate_id`. Several participants.tsv rows for one id, or
several sessions.tsv rows for one session, are one row when identical (with a note) and all
set aside as `duplicate_id` when they differ (then the subject's or session's images too).
A participant with no image is `missing_file`.
An image of a subject absent from participants.tsv has no age: it is `bad_age` when ages are
required, and a row without metadata otherwise (prediction needs only the image).
Without participants.tsv the folder is accepted only when ages are not required.

Manifest (a .csv, .tsv or .parquet file): columns ``participant_id``, ``path``, ``age``
(``age`` optional when ages are not required) and optionally ``sex``, ``site``, ``split``,
``session``; other columns are kept in ``extra``. Relative paths resolve against the
manifest's folder, which is the cohort root.

A single image file (.nii, .nii.gz, .mgz, .mgh), or a folder holding image files directly
(no participants.tsv, no sub-*/ folders), gives one row per image without metadata, named
after the file (``sub-01_T1w.nii.gz`` -> ``sub-01``): this is for prediction, so ages must
not be required. Two files with the same name but another extension are `duplicate_id`.

All kinds: "n/a" (and empty cells) are missing; "89+" is age 89.0 with ``age_censored``;
sex "m"/"male"/"f"/"female" become "M"/"F". An image whose real path (symlinks and ".."
resolved) leaves the cohort root is `outside_root` unless ``allow_outside_root``. Row
problems become :class:`QuarantineEntry` records, never exceptions: a repeated
participant_id + session (`duplicate_id`: rows that differ in any cell are ALL set aside,
since nothing says which one is right; identical rows collapse to one, with a note in
:attr:`Cohort.notes`), an age that
is not a number, negative or >= 150 (`bad_age`, whether or not ages are required), a missing
age when ages are required (`bad_age`), an image that does not exist (`missing_file`).
The whole table is refused with :class:`InputError` when it cannot be read, lacks a required
column, a row has no participant_id, or a `split` is not train/val/test (a split typo would
silently move subjects between training and evaluation).
Rows are sorted by (participant_id, session); quarantine entries by (participant_id, source).
"""

from __future__ import annotations

import os
from pathlib import Path

from rankcore.errors import InputError
from rankcore.locations import local_path
from rankcore.mri.tables import Table, parse_age, parse_sex, parse_split, read_table
from rankcore.mri.types import Cohort, CohortRow, QuarantineEntry

_MANIFEST_COLUMNS = ("participant_id", "path", "age", "sex", "site", "split", "session")
_BIDS_COLUMNS = ("participant_id", "age", "sex", "site", "split")
_MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")
_T1W_PATTERNS = ("*_T1w.nii", "*_T1w.nii.gz")
#: File names read as one image each (a single-image cohort, or a folder of images).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _image_id(path: Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01``; ``scan 3.mgz`` -> ``scan 3``."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    return name.removesuffix("_T1w") or name


def _read_images(paths: list[Path], root: Path, kind: str, allow_outside_root: bool,
                 require_age: bool) -> Cohort:
    """One row per image, named after its file, without metadata (prediction only)."""
    if require_age:
        raise InputError(f"{paths[0] if kind == 'image' else root}: an image file or a folder of "
                         "images carries no ages, and ages are required here: write a manifest "
                         "(.csv with participant_id, path, age) or a BIDS participants.tsv")
    out = _Collector(Path(os.path.realpath(root)), allow_outside_root, require_age)
    by_id: dict[str, list[Path]] = {}
    for path in sorted(paths):
        by_id.setdefault(_image_id(path), []).append(path)
    for pid, group in by_id.items():
        for other in group[1:]:  # as for BIDS: the first by name is kept
            out.reject(pid, str(other), "duplicate_id",
                       f"{other.name}: another image named {pid}; kept {group[0].name}")
        if out.image(pid, group[0], group[0].name):
            out.rows.append(CohortRow(participant_id=pid, path=group[0]))
    return out.cohort(kind)


class _Collector:
    """Accumulates rows and quarantine entries; enforces one row per participant + session."""

    def __init__(self, root: Path, allow_outside_root: bool, require_age: bool):
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.allow_outside_root = allow_outside_root
        self.require_age = require_age
        self.rows: list[CohortRow] = []
        self.quarantine: list[QuarantineEntry] = []
        self.notes: list[str] = []

    def reject(self, pid: str, source: str, category: str, message: str) -> None:
        self.quarantine.append(QuarantineEntry(pid, source, category, message))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def one_of(self, pid: str, session: str | None, group: list[tuple[str, dict]],
               sources: list[str]) -> bool:
        """Resolve the table rows of one key: True to go on with the first (identical rows,
        noted), False when they conflict (every row is quarantined as `duplicate_id`)."""
        if len(group) == 1:
            return True
        name = pid if session is None else f"{pid}/{session}"
        lines = ", ".join(_row_label(where) for where, _ in group)
        first = group[0][1]
        differ = sorted({k for _, cells in group[1:] for k in set(cells) | set(first)
                         if cells.get(k) != first.get(k)})
        if not differ:
            self.note(f"{group[0][0]}: {len(group)} identical rows of {name} ({lines}); "
                      "kept one")
            return True
        values = "; ".join(f"{k} " + " / ".join(str(c.get(k)) for _, c in group)
                           for k in differ)
        for (where, _), source in zip(group, sources):
            self.reject(pid, source, "duplicate_id",
                        f"{where}: {name} has {len(group)} rows ({lines}) that differ in "
                        f"{values}; all set aside (the table must say which is right)")
        return False

    def age(self, pid: str, text: str | None, source: str, where: str,
            ) -> tuple[bool, float | None, bool]:
        """Parse an age cell; returns (ok, age, censored) and quarantines a bad one."""
        age, censored, problem = parse_age(text)
        if problem is None and age is None and self.require_age:
            problem = "age is missing (n/a) and ages are required"
        if problem is not None:
            self.reject(pid, source, "bad_age", f"{where}: {problem}")
            return False, None, False
        return True, age, censored

    def image(self, pid: str, path: Path, where: str) -> bool:
        """Check that ``path`` stays inside the root and exists (else quarantine, False)."""
        real = Path(os.path.realpath(path))
        if not self.allow_outside_root and not real.is_relative_to(self.real_root):
            self.reject(pid, str(path), "outside_root",
                        f"{where}: image {path} resolves to {real}, outside the cohort root "
                        f"{self.real_root} (allow_outside_root / --allow-outside-root accepts it)")
            return False
        if not real.is_file():
            what = "is not a file" if real.exists() else "does not exist"
            self.reject(pid, str(path), "missing_file", f"{where}: image {path} {what}")
            return False
        return True

    def cohort(self, kind: str) -> Cohort:
        rows = sorted(self.rows, key=lambda r: (r.participant_id, r.session or ""))
        quarantine = sorted(self.quarantine,
                            key=lambda q: (q.participant_id, q.source, q.category))
        return Cohort(root=self.root, kind=kind, rows=tuple(rows), quarantine=tuple(quarantine),
                      notes=tuple(self.notes))


def _row_label(where: str) -> str:
    """"line 4" out of "/data/m.csv line 4" (the table is named once per message)."""
    return " ".join(where.rsplit(" ", 2)[-2:])


def _extra(cells: dict[str, str | None], known: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in cells.items() if k not in known and v is not None}


def _pid(cells: dict[str, str | None], where: str) -> str:
    pid = cells.get("participant_id")
    if pid is None:
        raise InputError(f"{where}: `participant_id` is empty")
    return pid


# ---------------------------------------------------------------------------------- manifest


def _read_manifest(path: Path, allow_outside_root: bool, require_age: bool) -> Cohort:
    required = ("participant_id", "path", "age") if require_age else ("participant_id", "path")
    try:
        table = read_table(path, known=_MANIFEST_COLUMNS, required=required)
    except InputError as e:
        if path.name != "participants.tsv":
            raise
        raise InputError(f"{e} (for a BIDS dataset pass its folder)") from None
    root = Path(os.path.realpath(path.parent))
    out = _Collector(root, allow_outside_root, require_age)
    groups: dict[tuple[str, str | None], list[tuple[str, dict]]] = {}
    for where, cells in table.rows:
        groups.setdefault((_pid(cells, where), cells.get("session")), []).append((where, cells))
    for (pid, session), group in groups.items():
        images = [_manifest_image(root, cells) for _, cells in group]
        sources = [str(im) if im is not None else where
                   for im, (where, _) in zip(images, group)]
        if not out.one_of(pid, session, group, sources):
            continue
        (where, cells), image, source = group[0], images[0], sources[0]
        split = parse_split(cells.get("split"), where)
        ok, age, censored = out.age(pid, cells.get("age"), source, where)
        if not ok:
            continue
        if image is None:
            out.reject(pid, source, "missing_file", f"{where}: `path` is empty")
            continue
        if not out.image(pid, image, where):
            continue
        out.rows.append(CohortRow(
            participant_id=pid, path=image, session=session, age=age, age_censored=censored,
            sex=parse_sex(cells.get("sex")), site=cells.get("site"), split=split,
            extra=_extra(cells, _MANIFEST_COLUMNS)))
    return out.cohort("manifest")


def _manifest_image(root: Path, cells: dict[str, str | None]) -> Path | None:
    """The image path of a manifest row (relative paths resolve against ``root``)."""
    given = cells.get("path")
    image = None if given is None else root / given  # an absolute `given` stays absolute
    if image is not None and ".." in image.parts:
        image = Path(os.path.realpath(image))
    return image


# -------------------------------------------------------------------------------------- BIDS


def _bids_images(root: Path) -> dict[str, dict[str | None, list[Path]]]:
    """participant_id -> session (None without ses- folders) -> T1w images sorted by name."""
    found: dict[str, dict[str | None, list[Path]]] = {}
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        anat_dirs = [(None, sub / "anat")]
        anat_dirs += [(ses.name, ses / "anat")
                      for ses in sorted(sub.glob("ses-*")) if ses.is_dir()]
        for session, anat in anat_dirs:
            images = sorted({p for pattern in _T1W_PATTERNS for p in anat.glob(pattern)})
            if images:
                found.setdefault(sub.name, {})[session] = images
    return found


def _session_ages(root: Path, pid: str, out: _Collector
                  ) -> dict[str, tuple[str, str | None] | None]:
    """session_id -> (where, age text) from sub-X/sub-X_sessions.tsv, when it has both columns;
    None for a session whose rows conflict (quarantined by :meth:`_Collector.one_of`)."""
    path = root / pid / f"{pid}_sessions.tsv"
    if not path.is_file():
        return {}
    table = read_table(path, known=("session_id", "age"))
    if "session_id" not in table.columns or "age" not in table.columns:
        return {}
    groups: dict[str, list[tuple[str, dict]]] = {}
    for where, cells in table.rows:
        if cells.get("session_id") is not None:
            groups.setdefault(cells["session_id"], []).append((where, cells))
    return {ses: (group[0][0], group[0][1]["age"])
            if out.one_of(pid, ses, group, [where for where, _ in group]) else None
            for ses, group in groups.items()}


def _read_bids(root: Path, allow_outside_root: bool, require_age: bool) -> Cohort:
    tsv = root / "participants.tsv"
    images = _bids_images(root)
    if tsv.is_file():
        table = read_table(tsv, known=_BIDS_COLUMNS, required=("participant_id",))
    elif require_age:
        raise InputError(f"{root}: a BIDS folder needs participants.tsv (with an `age` column) "
                         "when ages are required; a manifest must be a .csv, .tsv or .parquet")
    elif not images:
        raise InputError(f"{root}: neither a BIDS folder (no participants.tsv, no "
                         "sub-*/[ses-*/]anat/*_T1w.nii[.gz]), a manifest file nor a folder of "
                         f"images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        table = Table(tsv, ("participant_id",), ())
    if require_age and "age" not in table.columns:
        raise InputError(f"{tsv}: missing required column age (ages are required); found "
                         f"{', '.join(table.columns)}")
    out = _Collector(Path(os.path.realpath(root)), allow_outside_root, require_age)
    meta: dict[str, tuple[str, dict[str, str | None]]] = {}
    groups: dict[str, list[tuple[str, dict]]] = {}
    for where, cells in table.rows:
        pid = _pid(cells, where)
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        groups.setdefault(pid, []).append((where, cells))
        parse_split(cells.get("split"), where)  # refuse a bad split before any row is built
    conflicted = set()
    for pid, group in groups.items():
        if out.one_of(pid, None, group, [where for where, _ in group]):
            meta[pid] = group[0]
        else:
            conflicted.add(pid)
    for pid in sorted(set(meta) | set(images)):
        if pid in conflicted:
            for paths in images.get(pid, {}).values():
                for p in paths:
                    out.reject(pid, str(out.root / p.relative_to(root)), "duplicate_id",
                               f"{pid} has conflicting rows in participants.tsv: image set "
                               "aside with them")
            continue
        where, cells = meta.get(pid, (f"{pid} (not in participants.tsv)", {}))
        sessions = images.get(pid)
        if not sessions:
            out.reject(pid, str(out.root / pid), "missing_file",
                       f"{where}: no {pid}/[ses-*/]anat/*_T1w.nii[.gz] image")
            continue
        ses_ages = _session_ages(root, pid, out)
        for session, paths in sorted(sessions.items(), key=lambda kv: kv[0] or ""):
            image = out.root / paths[0].relative_to(root)
            if session in ses_ages and ses_ages[session] is None:
                for p in paths:
                    out.reject(pid, str(out.root / p.relative_to(root)), "duplicate_id",
                               f"{pid}/{session} has conflicting rows in its sessions.tsv: "
                               "image set aside with them")
                continue
            for other in paths[1:]:
                other = out.root / other.relative_to(root)
                name = pid if session is None else f"{pid}/{session}"
                out.reject(pid, str(other), "duplicate_id",
                           f"{other.name}: another T1w image of {name}; kept {image.name}")
            age_where, age_text = where, cells.get("age")
            if session in ses_ages and ses_ages[session][1] is not None:
                age_where, age_text = ses_ages[session]
            if not cells and age_text is None and require_age:
                out.reject(pid, str(image), "bad_age", f"{where}: {pid} has an image but no "
                                                       "row in participants.tsv, so no age")
                continue
            ok, age, censored = out.age(pid, age_text, str(image), age_where)
            if not ok or not out.image(pid, image, where):
                continue
            out.rows.append(CohortRow(
                participant_id=pid, path=image, session=session, age=age,
                age_censored=censored, sex=parse_sex(cells.get("sex")), site=cells.get("site"),
                split=parse_split(cells.get("split"), where),
                extra=_extra(cells, _BIDS_COLUMNS)))
    return out.cohort("bids")


def read_cohort(path: str | Path, *, allow_outside_root: bool = False,
                require_age: bool = True) -> Cohort:
    """Read a cohort from a BIDS root folder or a manifest file (see the module docstring).

    Args:
        path: BIDS root folder, manifest .csv / .tsv / .parquet, one image file, or a folder
            of image files (the last two only with ``require_age=False``).
        allow_outside_root: accept images whose real path leaves the cohort root (the BIDS
            folder, or the manifest's folder).
        require_age: every usable row must have an age (training, evaluation); False for
            prediction, where missing ages are allowed (malformed ones are still `bad_age`).

    Returns:
        The cohort: usable rows sorted by (participant_id, session) and quarantine entries.

    Raises:
        InputError: the path does not exist, is neither a folder nor a manifest file, or the
            table is unreadable / lacks required columns / has a row without participant_id
            or a split other than train, val, test. The message names the file.
    """
    p = local_path(path, "cohort").absolute()
    if p.is_dir():
        if not (p / "participants.tsv").is_file() and not _bids_images(p):
            images = [f for f in p.iterdir() if f.is_file() and _is_image(f)]
            if images:
                return _read_images(images, p, "images", allow_outside_root, require_age)
        return _read_bids(p, allow_outside_root, require_age)
    if not p.exists():
        raise InputError(f"{p}: cohort does not exist (expected a BIDS folder, a manifest "
                         ".csv, .tsv or .parquet, an image or a folder of images)")
    if _is_image(p):
        return _read_images([p], p.parent, "image", allow_outside_root, require_age)
    if p.suffix.lower() not in _MANIFEST_SUFFIXES:
        raise InputError(f"{p}: neither a BIDS folder, a manifest file (.csv, .tsv, .parquet) "
                         f"nor an image ({', '.join(IMAGE_SUFFIXES)})")
    return _read_manifest(p, allow_outside_root, require_age)
