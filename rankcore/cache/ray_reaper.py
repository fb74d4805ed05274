"""Which processes descend from which: the process tree read from /proc (Linux).

Used to find the Ray processes a brainrank process started (tests, benchmarks); ending them
when that process dies is :mod:`rankcore._reaper`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["children_of", "descendants"]


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22: starttime


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def children_of(pid: int) -> list[int]:
    """Pids of the living children of ``pid`` (empty where there is no /proc)."""
    if not os.path.isdir("/proc"):
        return []
    return _children().get(pid, [])


def descendants(roots: Iterable[int]) -> dict[int, int]:
    """``{pid: start time}`` of the living ``roots`` and all their descendants."""
    kids = _children()
    out: dict[int, int] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is None or pid in out:
            continue
        out[pid] = start
        todo.extend(kids.get(pid, ()))
    return out
