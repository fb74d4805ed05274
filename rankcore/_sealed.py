"""JSON files that carry their own checksum, so that a changed byte is noticed when read.

A sealed file is a JSON object with one more key, ``checksum``: ``"sha256:<hex>"`` of the
canonical JSON of everything else (keys sorted, no whitespace). Any change to the content —
a flipped bit, a hand edit, a truncated write — makes the checksum disagree, and the reader
refuses the file with a message naming it. Formatting (indentation) is not covered: it
carries no content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rankcore.errors import CorruptFileError

__all__ = ["CHECKSUM_KEY", "checksum", "parse_sealed", "read_sealed", "seal"]

CHECKSUM_KEY = "checksum"


def checksum(obj: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of ``obj`` without its ``checksum`` key."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with its ``checksum`` (replacing any earlier one)."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: checksum(body)}


def parse_sealed(text: str, what: str, *, required: bool = True) -> dict[str, Any]:
    """Parse a sealed JSON text and verify its checksum.

    Args:
        text: the file's content.
        what: how messages name the file (e.g. ``"model card '/m/card.json'"``).
        required: refuse content without a checksum (False: accept it unverified, for files
            written before sealing existed).

    Raises:
        CorruptFileError: not a JSON object, no checksum (when required), or a checksum
            that does not match the content.
    """
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise CorruptFileError(f"{what} is corrupt (not valid JSON: {err})") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{what} is corrupt (a JSON object expected, got "
                               f"{type(obj).__name__})")
    stored = obj.get(CHECKSUM_KEY)
    if stored is None:
        if required:
            raise CorruptFileError(f"{what} is corrupt or was not written by this version of "
                                   f"brainrank (it has no `{CHECKSUM_KEY}`)")
        return obj
    if stored != checksum(obj):
        raise CorruptFileError(f"{what} is corrupt: its content does not match its "
                               f"`{CHECKSUM_KEY}` (changed after it was written)")
    return obj


def read_sealed(path: str | os.PathLike[str], what: str, *,
                required: bool = True) -> dict[str, Any]:
    """Read and verify a sealed JSON file (see :func:`parse_sealed`); ``what`` names it.

    Raises:
        CorruptFileError: unreadable bytes (not UTF-8), bad JSON, or a checksum mismatch.
        OSError: the file cannot be opened (missing, no permission).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{what} is corrupt (byte {err.start} is not UTF-8)") from None
    return parse_sealed(text, what, required=required)
