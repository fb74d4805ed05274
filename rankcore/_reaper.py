"""A watchdog that ends this process's descendants when the process dies, even by kill -9.

Ray's local instance shares fate with its driver for most of its processes, but the agents
that its raylet starts (dashboard agent, runtime-env agent) outlive a driver killed outright.
:func:`reap_descendants_on_death` starts one small Python process that, every half second,
notes the descendants of this process (pid and start time), and when this process is gone
kills the ones its last two complete scans saw (a scan the death interrupted is dropped: the
children may be reparented half-way through it), if they are still the same processes (a
recycled pid has another start time and is left alone). It never kills anything while this
process lives.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["reap_descendants_on_death"]

_started: subprocess.Popen | None = None

_WATCHDOG = r"""
import os, signal, sys, time
parent, me = int(sys.argv[1]), os.getpid()

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]  # ppid, start time
    except (OSError, IndexError, ValueError):
        return None

def descendants():
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s:
                table[int(name)] = s
    found, todo = {}, [parent]
    while todo:
        p = todo.pop()
        for pid, (ppid, start) in table.items():
            if ppid == p and pid != me and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found

seen, last = {}, {}
while os.getppid() == parent:
    found = descendants()
    if os.getppid() != parent:
        break  # the parent died during the scan: its children may already be reparented
    seen, last = {**last, **found}, found  # the last two complete scans
    time.sleep(0.5)
for pid, start in seen.items():
    s = stat(pid)
    if s and s[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def reap_descendants_on_death() -> None:
    """Start the watchdog (once per process; Linux only, a no-op elsewhere)."""
    global _started
    if _started is not None or not os.path.isdir("/proc"):
        return
    _started = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
