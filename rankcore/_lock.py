"""A run-level lock per output folder: one writer at a time, a named holder, no stale locks.

The lock of an output path ``P`` (a model folder, a pipeline run folder, a report folder, a
predictions file) is the file ``P.parent/.P.name.lock``, so that it exists before ``P`` and
never makes ``P`` look non-empty. It holds one JSON line naming the holder: pid, host and
start time (UTC). Exclusion comes from ``flock`` on that file, which the kernel drops when the
holder dies (even by ``kill -9``): a lock file left by a dead process is therefore stale by
construction, and the next run takes it over and rewrites the holder. On release the holder
deletes the file, so a finished run leaves nothing behind.

The lock is re-entrant within one process (a flow holding it may call code that takes it
again), and a second process trying to take it gets :class:`~rankcore.errors.LockError` at
once, with the holder in the message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from rankcore.errors import LockError
from rankcore.locations import local_path

__all__ = ["lock_path", "read_holder", "run_lock"]

_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth), for re-entrancy
_guard = threading.Lock()


def lock_path(target: str | os.PathLike[str], what: str = "out") -> Path:
    """The lock file of the output path ``target`` (``target.parent/.target.name.lock``).

    Raises:
        InputError: ``target`` is an object-store URI (:func:`rankcore.locations.local_path`).
    """
    p = local_path(target, what).expanduser().absolute()
    return p.parent / f".{p.name}.lock"


def read_holder(path: str | os.PathLike[str]) -> dict | None:
    """The holder recorded in a lock file (pid, host, started), or None when unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}")


def _acquire(path: Path, what: str) -> int:
    """Open and flock ``path``; retry when the file was replaced under us."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockError(f"`{what}` {str(path.parent / path.name[1:-5])!r} is in use by "
                            f"another brainrank run ({_describe(read_holder(path))}); wait "
                            f"for it to finish or stop it") from None
        # The previous holder may have deleted the file between our open and our flock:
        # then we hold a lock on a file nobody else sees; start over on the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_lock(target: str | os.PathLike[str], what: str = "out") -> Iterator[Path]:
    """Hold the lock of the output path ``target`` while inside; yield the lock file's path.

    Args:
        target: the output folder or file the run writes.
        what: the option naming ``target`` in messages (e.g. ``"out"``).

    Raises:
        LockError: another live process holds the lock (the message names its pid, host and
            start time). A lock left by a dead process is taken over silently.
    """
    path = lock_path(target, what)
    key = str(path)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, what)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        with _guard:
            _held[key] = (fd, 1)
    try:
        yield path
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
        if depth == 1:
            # Delete while still holding the lock; a waiter that opened the old file notices
            # (samestat) and retries on a fresh one.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
