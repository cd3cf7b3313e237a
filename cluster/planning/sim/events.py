"""The discrete-event loop: a heap of (time, order, callback, argument).

Events at the same time run in the order they were scheduled, so a run is
a pure function of its inputs and seed. The loop's ``now`` is the clock the
production code under simulation reads (RouterCore's injectable clock).
"""

from __future__ import annotations

import heapq
from typing import Any, Callable


class EventLoop:
    def __init__(self, start: float = 0.0):
        self.now = start
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._order = 0
        self.processed = 0

    def clock(self) -> float:
        return self.now

    def at(self, when: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` at ``when`` (never before now)."""
        self._order += 1
        heapq.heappush(self._heap, (when if when > self.now else self.now, self._order, fn, arg))

    def after(self, delay: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.at(self.now + delay, fn, arg)

    def run(self, until: float, on_tick: Callable[[float], None] | None = None,
            tick_every: int = 65536) -> None:
        """Process events up to and including time ``until``."""
        heap, pop = self._heap, heapq.heappop
        n = 0
        while heap and heap[0][0] <= until:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            n += 1
            if on_tick is not None and n % tick_every == 0:
                on_tick(t)
        self.processed += n
        self.now = max(self.now, until)

    def pending(self) -> int:
        return len(self._heap)
