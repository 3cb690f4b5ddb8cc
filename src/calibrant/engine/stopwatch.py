"""Where the time of a compression goes: named sections, nested sections excluded from their parent."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Stopwatch:
    """Accumulates wall time per section name. A section opened inside another pauses the outer one, so
    each second is counted once: a block's forward section minus the statistics and compression done in
    its hooks is the forward time."""

    def __init__(self, *names: str) -> None:
        self.totals: dict[str, float] = dict.fromkeys(names, 0.0)
        self._stack: list[tuple[str, float]] = []  # (section, when it last (re)started)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing section
            outer, started = self._stack[-1]
            self.totals[outer] = self.totals.get(outer, 0.0) + now - started
        self._stack.append((name, now))
        try:
            yield
        finally:
            now = time.perf_counter()
            _, started = self._stack.pop()
            self.totals[name] = self.totals.get(name, 0.0) + now - started
            if self._stack:  # resume it
                self._stack[-1] = (self._stack[-1][0], now)
