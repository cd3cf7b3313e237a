"""Calls an ingress holds while no router is up for their model.

``RouterClient`` parks a call when every router in its model's order is
down (all on a lost node, restarting): it waits for the first router back
(``RouterClient._unpark``), or for its timer, which ends it as unavailable
(HTTP 503). At most ``MAX_PARKED`` wait at once; more are refused at once.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from splitserve.cluster.serve.router_client_state import PendingCall

MAX_PARKED = 4096


class ParkedCalls:
    """Parked calls, each with its timer; ``expire(call, waited_s)`` runs
    when a call's timer ends before a router came back."""

    def __init__(self, expire: Callable[[PendingCall, float], None]):
        self._expire_cb = expire
        self._timers: dict[PendingCall, asyncio.TimerHandle] = {}
        self.total = 0  # calls parked since the start

    def __len__(self) -> int:
        return len(self._timers)

    def full(self) -> bool:
        return len(self._timers) >= MAX_PARKED

    def park(self, loop: asyncio.AbstractEventLoop, p: PendingCall, wait_s: float) -> None:
        self.total += 1
        self._timers[p] = loop.call_later(wait_s, self._expire, p, wait_s)

    def _expire(self, p: PendingCall, wait_s: float) -> None:
        if self._timers.pop(p, None) is not None:
            self._expire_cb(p, wait_s)

    def drop(self, p: PendingCall) -> None:
        """``p`` no longer waits (released or cancelled)."""
        timer = self._timers.pop(p, None)
        if timer is not None:
            timer.cancel()

    def drain(self) -> list[PendingCall]:
        """Every parked call, in the order parked; none is parked after."""
        calls = list(self._timers)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        return calls

    def forget(self) -> None:
        """Drop every call without cancelling timers (their event loop ended)."""
        self._timers.clear()
