"""Where caches and model folders live: a POSIX path, given as a path or a ``file://`` URI.

A cache, a model folder and a report are written with atomic renames, ``fsync`` and ``flock``
lock files, and a cache is read through memory maps (``pyarrow.memory_map``). Object stores
(``s3://``, ``gs://``, ``az://``, ...) offer none of these, so these folders must be on a
POSIX file system (on a cluster: one shared file system mounted at the same path on every
node). Only Ray Train's run storage (``storage_path``, :mod:`rankcore.train.storage`) takes an
object-store URI.

:func:`local_path` is the one place a user's location becomes a :class:`~pathlib.Path`:
``file://`` URIs are turned into their path, and any other URI is refused, so that
``Path("s3://bucket/x")`` never silently becomes a local folder ``s3:/bucket/x``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from rankcore.errors import InputError

__all__ = ["is_uri", "local_path"]

#: Why a cache or model folder cannot be an object-store URI (ends every refusal).
POSIX_REASON = ("caches, model folders and reports need atomic renames, fsync, file locks and "
                "memory maps, which object stores lack: use a shared POSIX file system "
                "(NFS, EFS, Filestore, Lustre) mounted at the same path on every node; only "
                "Ray Train's `storage_path` takes an object-store URI")


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``s3://b/x``, ``file:///x``), False for a file system path.

    >>> is_uri("s3://bucket/x"), is_uri("file:///data"), is_uri("/data/s3://x")
    (True, True, False)
    """
    scheme, sep, _ = os.fspath(location).partition("://")
    return bool(sep) and scheme.isidentifier()


def local_path(location: str | os.PathLike[str], name: str) -> Path:
    """``location`` as a local path: a path as given, or the path of a ``file://`` URI.

    Args:
        location: a path, or a ``file:///abs/path`` URI (``file://localhost/...`` too;
            percent-escapes decoded).
        name: the argument's name, for the error message.

    Returns:
        The path (relative paths stay relative; nothing is resolved).

    Raises:
        InputError: an empty location, a ``file://`` URI naming another host, or a URI of any
            other scheme (see the module docstring for why).

    >>> local_path("file:///data/my%20cache", "cache")
    PosixPath('/data/my cache')
    """
    text = os.fspath(location)
    if not text:
        raise InputError(f"`{name}` must be a path or a file:// URI, got ''")
    if not is_uri(text):
        return Path(text)
    parts = urlsplit(text)
    if parts.scheme.lower() != "file":
        raise InputError(f"`{name}` must be a path or a file:// URI on a shared POSIX file "
                         f"system, got {text!r}: {POSIX_REASON}")
    if parts.netloc not in ("", "localhost") or not parts.path:
        raise InputError(f"`{name}` must be a file:// URI of a local path (file:///abs/path), "
                         f"got {text!r}")
    return Path(unquote(parts.path))
