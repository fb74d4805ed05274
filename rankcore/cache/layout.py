"""Where a cache keeps its files, and how they are written: atomically, with checksums.

Layout (one folder per preprocessing config, so a changed config never mixes with an old one)::

    CACHE_DIR/<preproc_digest>/config.json         the PreprocessConfig (JSON)
    CACHE_DIR/<preproc_digest>/manifest.json       the accepted shards, with sha256 and keys
    CACHE_DIR/<preproc_digest>/shards/part-*.parquet
    CACHE_DIR/<preproc_digest>/quarantine.parquet  subjects set aside, with the reason

Every file is written to a temporary name in its own folder, fsynced, then ``os.replace``d,
so a reader sees either the old file or the new one, never half of one. Readers trust only
the shards the manifest lists (name, byte size, sha256): a half-written or orphaned file is
never read, and the next ingest deletes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.cache.schema import CACHE_SCHEMA
from rankcore.errors import InputError
from rankcore.mri.types import PreprocessConfig

MANIFEST_FORMAT = 1
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one preprocessing config's cache under ``cache_dir``."""

    cache_dir: Path
    digest: str

    @classmethod
    def for_config(cls, cache_dir: str | Path, config: PreprocessConfig) -> CacheLayout:
        return cls(Path(cache_dir), config.digest())

    @property
    def folder(self) -> Path:
        return self.cache_dir / self.digest

    @property
    def shard_dir(self) -> Path:
        return self.folder / "shards"

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    @property
    def quarantine_path(self) -> Path:
        return self.folder / "quarantine.parquet"

    @property
    def lock_path(self) -> Path:
        return self.folder / ".lock"

    def shard_path(self, name: str) -> Path:
        return self.shard_dir / name


def find_layout(cache_dir: str | Path, config: PreprocessConfig | None = None) -> CacheLayout:
    """The layout of ``config`` under ``cache_dir``, or of its only config when ``config`` is None.

    Raises:
        InputError: no cache there, or several configs and none chosen.
    """
    root = Path(cache_dir)
    if config is not None:
        layout = CacheLayout.for_config(root, config)
        if not layout.manifest_path.is_file():
            raise InputError(f"`cache_dir` must hold a cache for config {layout.digest} "
                             f"(run `brainrank ingest` first), got {str(root)!r}")
        return layout
    found = sorted(p.parent.name for p in root.glob("*/manifest.json") if p.is_file())
    if not found:
        raise InputError(f"`cache_dir` must hold a brainrank cache (run `brainrank ingest` "
                         f"first), got {str(root)!r}")
    if len(found) > 1:
        raise InputError(f"`config` must be given: `cache_dir` {str(root)!r} holds caches for "
                         f"{len(found)} preprocessing configs ({', '.join(found)})")
    return CacheLayout(root, found[0])


def read_config(layout: CacheLayout) -> PreprocessConfig:
    """The PreprocessConfig stored in ``layout.config_path``."""
    try:
        data = json.loads(layout.config_path.read_text(encoding="utf-8"))
        data["shape"] = tuple(data["shape"])
        return PreprocessConfig(**data)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"`config.json` of cache {str(layout.folder)!r} is unreadable: "
                         f"{exc}") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes | pa.Buffer | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """Serialise a small table (the quarantine) to zstd Parquet in memory, page checksums on."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes (streamed, constant memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class ShardInfo:
    """A written shard: file name, sha256, size in bytes, row count and the keys it holds."""

    name: str
    seq: int
    sha256: str
    bytes: int
    rows: int
    keys: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seq": self.seq, "sha256": self.sha256, "bytes": self.bytes,
                "rows": self.rows, "keys": list(self.keys)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(name=str(d["name"]), seq=int(d["seq"]), sha256=str(d["sha256"]),
                   bytes=int(d["bytes"]), rows=int(d["rows"]), keys=[str(k) for k in d["keys"]])


def shard_name(seq: int) -> str:
    """A fresh shard file name: sequence number (ingest order) plus a random token."""
    return f"part-{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"


class _HashingFile:
    """A binary file open for writing that feeds every byte written to a sha256 as it goes.

    ParquetWriter writes strictly sequentially, so the running digest is that of the file:
    committing a shard needs no second pass over its bytes. ``start_sync`` sends the bytes
    written so far to disk in a background thread while the caller prepares the next row,
    so that the final fsync has little left to wait for.
    """

    def __init__(self, path: Path):
        self._fh = open(path, "xb")  # closed by release()
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def start_sync(self) -> None:
        """Start an fdatasync of what was written so far, unless one is still running.

        Raises:
            OSError: an earlier background fdatasync failed.
        """
        if self._sync is not None and self._sync.is_alive():
            return
        self.wait_sync()
        self._fh.flush()
        self._sync = threading.Thread(target=self._run_sync, args=(self._fh.fileno(),),
                                      name="shard-fdatasync", daemon=True)
        self._sync.start()

    def _run_sync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:  # reported to the writer by wait_sync
            self._sync_error = exc

    def wait_sync(self) -> None:
        """Wait for the background fdatasync; re-raise its error (the kernel reports a write
        error to one fsync only, so it must not be lost)."""
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_error is not None:
            exc, self._sync_error = self._sync_error, None
            raise exc

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.nbytes += self._fh.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self._fh.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    _closed = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fh.fileno()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        """Called by pyarrow when the Parquet writer closes: flush; keep the descriptor for
        fsync (``release`` closes it)."""
        if not self._closed:
            self._fh.flush()
            self._closed = True

    def release(self) -> None:
        """Close the file (after any background fdatasync on its descriptor has returned)."""
        self._closed = True
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        self._fh.close()


class ShardWriter:
    """Stream cache rows into a new shard, one row group per row; publish it atomically.

    Rows go to a temporary file in ``shard_dir`` as they come (so memory holds one volume,
    not a batch), and through a sha256 as they are written; ``commit`` fsyncs the file once
    and renames it to its final name (then fsyncs the folder). Until then no file with a
    shard name exists, and ``abort`` (or an exception inside ``with``) deletes the temporary
    file. No column is compressed or dictionary-encoded and none carries statistics: with one
    row per row group each page holds one value, so these only cost time; reading one row is
    decoding one PLAIN page from a memory map. Every page carries a CRC32 checksum.
    """

    def __init__(self, shard_dir: Path, seq: int):
        self.shard_dir = Path(shard_dir)
        self.seq = seq
        self.name = shard_name(seq)
        self.tmp = self.shard_dir / f"{_TMP_PREFIX}{self.name}"
        self.keys: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink: _HashingFile | None = None

    def _open(self) -> pq.ParquetWriter:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._sink = _HashingFile(self.tmp)
        try:
            return pq.ParquetWriter(
                self._sink, CACHE_SCHEMA, compression="none", use_dictionary=False,
                write_statistics=False, write_page_checksum=True)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        """Close the Parquet writer (writes the footer) and the file."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._writer = None
            if self._sink is not None:
                self._sink.release()

    def write(self, table: pa.Table) -> None:
        """Append the rows of a CACHE_SCHEMA table, one row group each."""
        if self._writer is None:
            self._writer = self._open()
        self._writer.write_table(table, row_group_size=1)
        self._sink.start_sync()
        self.keys += table.column("key").to_pylist()

    def commit(self) -> ShardInfo | None:
        """Publish the shard under its final name; None (and no file) when no row was written."""
        if self._writer is None:
            return None
        sink = self._sink
        try:
            self._writer.close()
            self._writer = None
            sink.close()
            sink.wait_sync()
            os.fsync(sink.fileno())
            sink.release()
            digest, size = sink.hexdigest(), sink.nbytes
            if self.tmp.stat().st_size != size:
                raise OSError(f"{self.tmp} holds {self.tmp.stat().st_size} B, "
                              f"{size} B were written")
            os.replace(self.tmp, self.shard_dir / self.name)
        except BaseException:
            self._close()
            self.tmp.unlink(missing_ok=True)
            raise
        finally:
            self._sink = None
        _fsync_dir(self.shard_dir)
        return ShardInfo(name=self.name, seq=self.seq, sha256=digest, bytes=size,
                         rows=len(self.keys), keys=list(self.keys))

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self._close()
        finally:
            self._sink = None
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._writer is not None:
            self.abort()


def write_shard(table: pa.Table, shard_dir: Path, seq: int) -> ShardInfo | None:
    """Write a whole CACHE_SCHEMA table as one new shard (see ShardWriter)."""
    with ShardWriter(shard_dir, seq) as writer:
        writer.write(table)
        return writer.commit()


@dataclass
class Manifest:
    """The accepted shards of one cache, in commit order.

    ``complete`` is False while an ingest is between its first commit and its final
    compaction; then a key may appear in two shards and the higher ``seq`` wins.
    """

    digest: str
    shards: list[ShardInfo] = field(default_factory=list)
    next_seq: int = 1
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "preproc_digest": self.digest,
                "next_seq": self.next_seq, "complete": self.complete,
                "shards": [s.to_dict() for s in self.shards]}

    def take_seq(self, n: int = 1) -> int:
        """Reserve ``n`` consecutive sequence numbers; return the first."""
        first = self.next_seq
        self.next_seq += n
        return first


def read_manifest(layout: CacheLayout) -> Manifest:
    """The manifest of ``layout`` (an empty one when the cache is new).

    Raises:
        InputError: the manifest exists but cannot be parsed, or names another config.
    """
    if not layout.manifest_path.exists():
        return Manifest(layout.digest)
    try:
        d = json.loads(layout.manifest_path.read_text(encoding="utf-8"))
        if int(d["format"]) != MANIFEST_FORMAT:
            raise ValueError(f"format {d['format']} is not {MANIFEST_FORMAT}")
        manifest = Manifest(digest=str(d["preproc_digest"]),
                            shards=[ShardInfo.from_dict(s) for s in d["shards"]],
                            next_seq=int(d["next_seq"]), complete=bool(d["complete"]))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"`manifest.json` of cache {str(layout.folder)!r} is unreadable "
                         f"({exc}); delete the folder to rebuild it") from None
    if manifest.digest != layout.digest:
        raise InputError(f"`manifest.json` in {str(layout.folder)!r} must describe config "
                         f"{layout.digest}, got {manifest.digest}")
    return manifest


def write_manifest(layout: CacheLayout, manifest: Manifest) -> None:
    """Atomically replace the manifest."""
    text = json.dumps(manifest.to_dict(), indent=1, sort_keys=True)
    atomic_write_bytes(layout.manifest_path, text.encode())


def write_config(layout: CacheLayout, config: PreprocessConfig) -> None:
    """Write config.json once (it never changes: a changed config has another folder)."""
    if layout.config_path.exists():
        return
    text = json.dumps(config.to_dict(), indent=1, sort_keys=True)
    atomic_write_bytes(layout.config_path, text.encode())


def remove_strays(layout: CacheLayout, manifest: Manifest) -> list[str]:
    """Delete temporary files and shard files the manifest does not list; return their names."""
    keep = {s.name for s in manifest.shards}
    removed = []
    for folder in (layout.folder, layout.shard_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            stray_tmp = p.name.startswith(_TMP_PREFIX)
            stray_shard = folder == layout.shard_dir and p.name not in keep
            if p.is_file() and (stray_tmp or stray_shard):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


@contextlib.contextmanager
def cache_lock(layout: CacheLayout) -> Iterator[None]:
    """Hold an exclusive lock on the cache folder while ingesting (one writer at a time).

    Raises:
        InputError: another process holds the lock.
    """
    layout.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"`cache_dir` {str(layout.folder)!r} is being written by another "
                             f"ingest; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
