"""Writing one Parquet shard: streamed to a temporary file, checksummed (CRC-32) while
written, fsynced, then renamed into place by ``commit`` (see ``rankcore.cache.layout`` for the
folder layout and the checksum).
"""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.cache.layout import _TMP_PREFIX, ShardInfo, _fsync_dir, crc32_checksum, shard_name
from rankcore.cache.schema import CACHE_SCHEMA


class _HashingFile:
    """A binary file open for writing that feeds every byte written to a CRC-32 as it goes.

    ParquetWriter writes strictly sequentially, so the running CRC is that of the file:
    committing a shard needs no second pass over its bytes. ``start_sync`` sends the bytes
    written so far to disk in a background thread while the caller prepares the next row,
    so that the final fsync has little left to wait for.
    """

    def __init__(self, path: Path):
        self._fh = open(path, "xb")  # closed by release()
        self._crc = 0
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
        self._crc = zlib.crc32(view, self._crc)
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

    def checksum(self) -> str:
        """The file's checksum as the manifest spells it (``"crc32:<hex>"``)."""
        return crc32_checksum(self._crc)

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
    not a batch), and through a CRC-32 as they are written; ``commit`` fsyncs the file once
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
            checksum, size = sink.checksum(), sink.nbytes
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
        return ShardInfo(name=self.name, seq=self.seq, checksum=checksum, bytes=size,
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
