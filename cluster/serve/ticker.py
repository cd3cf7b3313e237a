"""A periodic task of an async actor: ``tick`` every ``interval_s`` on the
actor's event loop, started on first need (an actor's constructor has no
loop yet) and restarted if it ever ended; a tick that raises is logged and
the next one runs, so one bad tick never stops the actor's housekeeping."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable


class Ticker:
    def __init__(self, interval_s: float, tick: Callable[[], None], log: logging.Logger,
                 what: str):
        self.interval_s = interval_s
        self._tick = tick
        self._log = log
        self._what = what
        self._task: asyncio.Task | None = None

    def ensure(self) -> None:
        """Start ticking unless already running (no-op when interval_s <= 0)."""
        if self.interval_s > 0 and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick
                self._log.exception("%s tick failed", self._what)
