"""SIGINT and SIGTERM as one exception, so every ``finally`` (temporary outputs, open transactions) runs.

The CLI calls :func:`install` once: both signals then raise :class:`Interrupted` in the main thread,
a ``KeyboardInterrupt`` subclass, so code that already cleans up after Ctrl-C cleans up after
``kill`` (SIGTERM) too; the CLI exits ``128 + signal`` (130 / 143). A few steps must not be cut in
half (swapping a finished output into place): they run under :func:`deferred`, and a signal that
arrives meanwhile is raised right after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise it: for steps that must finish once begun."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def exit_code(exc: BaseException) -> int:
    """The shell's exit status for an interrupt: 130 for SIGINT (or a plain KeyboardInterrupt), 143 for SIGTERM."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT
