"""A one-line progress bar on stderr (no dependency): requests done, failed,
elapsed time. Redrawn at most 10 times a second; silent when disabled."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None,
                 label: str = "requests"):
        self.total, self.enabled, self.label = total, enabled, label
        self.stream = stream or sys.stderr
        self.done = self.failed = 0
        self._t0 = time.monotonic()
        self._last_draw = 0.0
        if enabled:
            self._draw()

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.done == self.total):
            self._draw()

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(WIDTH * frac)
        bar = "#" * filled + "." * (WIDTH - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"[{bar}] {self.done}/{self.total} {self.label}{failed} "
                f"{time.monotonic() - self._t0:.1f}s")

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        self.stream.write("\r" + self.line())
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
