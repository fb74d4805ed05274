"""Progress bars for long work (ingest, training epochs, prediction), quiet off a terminal.

A thin layer over tqdm: bars are drawn on stderr only when it is a terminal (tqdm's
``disable=None``) and never when :func:`set_quiet` was called (``brainrank -q``), so logs
and test output stay clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["is_quiet", "progress_bar", "set_quiet"]

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (True) or back to automatic (False)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    """True when :func:`set_quiet` turned bars off."""
    return _quiet


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "subject"
                 ) -> Iterator[Callable[[int, int | None], None]]:
    """A bar as a ``update(done, total)`` callback (absolute counts, as ingest reports them).

    Args:
        desc: the bar's label.
        total: expected count (None: unknown until the first update).
        unit: what is counted.

    Yields:
        ``update(done, total)``: moves the bar to ``done`` of ``total``.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=True if _quiet else None,
               leave=False, dynamic_ncols=True)

    def update(done: int, todo: int | None = None) -> None:
        if todo is not None and bar.total != todo:
            bar.total = todo
            bar.refresh()
        bar.update(max(0, int(done) - bar.n))

    try:
        yield update
    finally:
        bar.close()
