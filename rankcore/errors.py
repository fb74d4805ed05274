"""Exceptions raised by brainrank, in one place.

Each subclasses the fitting built-in so callers can catch either:
``InputError`` is a ``ValueError`` (a value the user gave is unusable), ``TrainingError`` is a
``RuntimeError`` (training went wrong at run time).
"""

from __future__ import annotations


class BrainrankError(Exception):
    """Base class of every error brainrank raises on purpose."""


class InputError(BrainrankError, ValueError):
    """A value, file or table given by the user cannot be used; the message says why."""


class ShapeError(InputError):
    """An array has the wrong number of dimensions or the wrong length."""


class SorterLengthError(ShapeError):
    """A fixed-length sorter was given a sequence of another length."""


class QuarantineError(InputError):
    """One subject cannot be ingested; ``category`` names the reason (see rankcore.mri)."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


class CheckpointError(InputError):
    """A weights file or its card is missing, corrupt or does not match what was asked."""


class TrainingError(BrainrankError, RuntimeError):
    """Training cannot go on (for example the loss became NaN)."""


class LockError(InputError):
    """An output folder is being written by another run; the message names the holder."""


class IncompleteCacheError(InputError):
    """A cache was left by an interrupted ingest (its manifest says ``complete: false``)."""


class CorruptFileError(InputError):
    """A file brainrank wrote no longer matches its checksum; the message names the file."""
