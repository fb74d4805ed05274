"""End the Ray processes a brainrank process started when that process dies, however it dies.

Ray ties its GCS server and raylet to the driver that started them, but their children (the
dashboard and runtime-env agents) outlive a driver killed with SIGKILL. :func:`start_reaper`
starts a small watcher process that the kernel signals when the driver dies
(``PR_SET_PDEATHSIG``); it keeps a list of the Ray processes (the given roots and all their
descendants, refreshed every ``interval`` seconds) and, once the driver is gone, sends them
SIGTERM, then SIGKILL to those still alive two seconds later. A process is identified by its
pid and start time, so a recycled pid is never signalled. Linux only (elsewhere: no-op).

Run as ``python -I ray_reaper.py DRIVER_PID ROOT_PID...`` (standard library only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

__all__ = ["children_of", "descendants", "start_reaper"]

_PR_SET_PDEATHSIG = 1


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


def _kill(known: dict[int, int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = {p: s for p, s in known.items() if _start_time(p) == s}
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(_start_time(p) == s
                                                  for p, s in alive.items()):
            time.sleep(0.1)


def _watch(driver: int, roots: list[int], interval: float = 0.5) -> None:
    import ctypes

    gone = False

    def on_term(signum, frame):  # the kernel's parent-death signal, or a plain kill
        nonlocal gone
        gone = True

    signal.signal(signal.SIGTERM, on_term)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    known = descendants(roots)
    while not gone and os.getppid() == driver:
        known.update(descendants(roots) or {})
        known.update(descendants(list(known)))
        known = {p: s for p, s in known.items() if _start_time(p) == s}
        time.sleep(interval)
    if os.getppid() != driver or _start_time(driver) is None:
        _kill(known)


def start_reaper(roots: Iterable[int]) -> subprocess.Popen | None:
    """Watch ``roots`` (pids of processes this one started) and their descendants; end them
    when this process dies. Returns the watcher (None where there is no /proc)."""
    roots = [int(p) for p in roots]
    if not roots or not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    # Run as a plain script in isolated mode: it needs only the standard library, and must be
    # watching within milliseconds (``-m rankcore.cache...`` would import the whole package).
    return subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *map(str, roots)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
