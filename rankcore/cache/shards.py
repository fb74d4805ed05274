"""Opening and checking shard files: memory-mapped, with page checksums, never trusted blindly.

Two levels of checking:

- ``verify_shard(..., full=True)`` (every ingest): the file's size and checksum (CRC-32 of
  every byte; sha256 for shards of older manifests) must equal the manifest's, so flipped
  bytes anywhere are caught before a shard's rows are reused.
- ``full=False`` (readers): size and Parquet footer only; the data pages carry CRC32 page
  checksums that pyarrow verifies as it decodes them, so a corrupt page raises when read
  instead of returning wrong voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rankcore.cache.layout import CacheLayout, ShardInfo, checksum_matches
from rankcore.cache.schema import CACHE_SCHEMA, METADATA_COLUMNS


def open_shard(path: Path) -> pq.ParquetFile:
    """A memory-mapped ParquetFile that verifies page checksums on every read."""
    return pq.ParquetFile(pa.memory_map(str(path), "r"), page_checksum_verification=True)


def verify_shard(layout: CacheLayout, info: ShardInfo, *, full: bool) -> str | None:
    """Return why the shard cannot be trusted, or None when it checks out.

    Args:
        layout: the cache the shard belongs to.
        info: the manifest's record of the shard.
        full: also compare the checksum of the whole file (reads every byte).
    """
    path = layout.shard_path(info.name)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file is missing"
    except OSError as exc:
        return f"cannot stat: {exc}"
    if size != info.bytes:
        return f"size {size} B differs from the manifest's {info.bytes} B (truncated?)"
    try:
        if full and not checksum_matches(path, info.checksum):
            return "checksum differs from the manifest's (corrupted bytes)"
        meta = open_shard(path).metadata
    except (OSError, pa.ArrowException) as exc:
        return f"not a readable Parquet file: {exc}"
    if meta.num_rows != info.rows:
        return f"{meta.num_rows} rows, the manifest says {info.rows}"
    if not meta.schema.to_arrow_schema().remove_metadata().equals(
            CACHE_SCHEMA.remove_metadata()):
        return "schema differs from this brainrank version's cache schema"
    return None


def read_shard_metadata(path: Path, columns: Sequence[str] = METADATA_COLUMNS) -> pa.Table:
    """Every row of a shard without the volume column (page checksums verified).

    Raises:
        OSError / pyarrow.ArrowException: the file is unreadable or a page is corrupt.
    """
    return open_shard(path).read(columns=list(columns))
