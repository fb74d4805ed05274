"""Where Ray Train keeps run state: a path every node sees, or a URI, never mixed up.

Ray Train (``RunConfig(storage_path=...)``) accepts an absolute local path (which, on a
cluster, must be a shared file system mounted at the same place on every node) or a URI that
pyarrow understands (``s3://``, ``gs://``, ``file://``, ...). A URI must reach Ray as it is:
``Path("s3://bucket/x").resolve()`` would turn it into a local folder named ``s3:``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rankcore.errors import InputError
from rankcore.locations import is_uri

__all__ = ["is_uri", "join_storage", "storage_location"]


def storage_location(location: str | os.PathLike[str]) -> str:
    """``location`` as Ray Train's ``storage_path``: a URI unchanged, a path made absolute.

    Raises:
        InputError: an empty location.
    """
    text = os.fspath(location)
    if not text:
        raise InputError("`storage_path` must be a path or a URI, got ''")
    if is_uri(text):
        return text
    return str(Path(text).expanduser().absolute())


def join_storage(location: str | os.PathLike[str], *parts: str) -> str:
    """``location``/``parts``: joined with ``/`` for a URI (its scheme kept), as a path else."""
    base = storage_location(location)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))
