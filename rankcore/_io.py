"""Atomic file writes: write a temporary file in the target's folder, then ``os.replace``.

A crash or an exception never leaves a half-written file under the final name, and the
temporary file is removed on failure. (The Parquet cache uses its own fsync'd variant in
``rankcore.cache.layout``, because it must also survive power loss.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *,
                 suffix: str = ".tmp", mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it in place.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given.
        suffix: suffix of the temporary file (some writers infer the format from it).
        mode: permission bits of the final file (``mkstemp`` would leave 0600).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_leftovers(target: str | os.PathLike[str]) -> None:
    """Remove what a writer of ``target`` killed mid-way left next to it.

    Temporary siblings ``.NAME.tmp-*`` are deleted; a replaced ``.NAME.old-*`` is restored
    when ``target`` itself is missing (the kill fell between the two renames of a swap) and
    deleted otherwise. Call it only while holding ``target``'s lock (rankcore._lock).
    """
    import shutil

    target = Path(target)
    for old in target.parent.glob(f".{target.name}.old-*"):
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
