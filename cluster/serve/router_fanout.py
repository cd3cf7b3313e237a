"""What a worker replica sends to every router actor: its stats pushes
(``StatsReport``) and its goodbye. Every router holds every replica's
stats and prefixes, so the standbys can take a model over at once."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from splitserve.cluster.serve.router_names import NAMESPACE, router_name
from splitserve.router.reports import StatsReport


class RouterFanout:
    """What a worker replica sends to every router: its stats pushes and its
    goodbye. A router that fails a push is looked up again next time."""

    def __init__(self, count: int):
        self._handles: list[Any] = [None] * count
        self._missed = [False] * count  # a push to it failed since it last took one

    def _handle(self, i: int):
        if self._handles[i] is None:
            self._handles[i] = ray.get_actor(router_name(i), namespace=NAMESPACE)
        return self._handles[i]

    async def push(self, report: StatsReport, timeout_s: float) -> bool:
        """Push ``report`` to every router. Returns True when the next push
        must carry a snapshot of the prefix cache: a router did not know this
        replica, or took this push after missing some (not while it is down:
        a snapshot every period would cost every router). Raises only when
        every router failed."""

        async def one(i: int) -> bool:
            try:
                return await asyncio.wait_for(self._handle(i).update_stats.remote(report),
                                              timeout_s)
            except BaseException:
                self._handles[i] = None
                raise

        results = await asyncio.gather(*(one(i) for i in range(len(self._handles))),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        snapshot = False
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                self._missed[i] = True
            else:
                snapshot = snapshot or r is True or self._missed[i]
                self._missed[i] = False
        return snapshot

    def remove_replica(self, replica_id: str) -> None:
        """Tell every router this replica is leaving (fire and forget)."""
        for i in range(len(self._handles)):
            try:
                self._handle(i).remove_replica.remote(replica_id)
            except Exception:  # noqa: BLE001 - that router learns it from the missing pushes
                self._handles[i] = None
