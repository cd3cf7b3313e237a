"""RouteClient: an ingress's ``Routing`` that follows the route controller
(``splitserve.cluster.serve.route_actor``).

Every ``period_s`` one ``RouteReport`` goes to the controller with the
outcomes of the routed requests that ended since the last one and the table
version this ingress holds; the reply carries the table when it changed
(a deploy edited the routes, a ramp moved). So a weight edit reaches every
ingress within one period, with no replica restarted: requests already
running keep the variant they were given. Until the first reply the table
is the one the ingress was deployed with. While the controller is away
(restarting) the ingress keeps its table and at most ``MAX_BUFFERED``
outcomes, the oldest dropped first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from typing import Any

from splitserve.cluster.api.routing import Routing
from splitserve.cluster.config.routes import servable_names
from splitserve.router.route_book import RouteBook
from splitserve.router.route_messages import RouteReply, RouteReport, RouteTable, VariantOutcome, decode, encode

log = logging.getLogger("splitserve.route_client")

MAX_BUFFERED = 65536  # outcomes held for the controller (RouteReport's bound)
CALL_TIMEOUT_S = 5.0


class RouteClient(Routing):
    def __init__(self, table: RouteTable, served: set[str], period_s: float,
                 handle: Any = None):
        """``table``: the routes as deployed (until the controller answers);
        ``served``: the models this ingress serves; ``handle``: the
        controller's actor handle, else looked up by name."""
        super().__init__(table, served)
        self.period_s = period_s
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._handle = handle
        self._buffer: deque[VariantOutcome] = deque(maxlen=MAX_BUFFERED)
        self._seen = -1  # table version held from the controller; -1: none yet
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts = {"exchanges": 0, "failures": 0}

    def record(self, outcome: VariantOutcome) -> None:
        super().record(outcome)
        self._buffer.append(outcome)
        self._start()

    def resolve(self, model, key_for):
        self._start()
        return super().resolve(model, key_for)

    async def start(self) -> None:
        """One exchange now (so the ingress starts with the weights in
        force), then one every period."""
        try:
            await self.sync()
        except Exception as e:  # noqa: BLE001 - not up yet: the deployed table serves
            log.warning("route controller not reachable (%r); serving the deployed routes", e)
        self._start()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a preparation thread: the loop's next call starts it
        if self._task is not None and not self._task.done() and self._loop.is_running():
            return  # one sync loop per process, on the loop that started it
        self._loop = loop
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - restarting: keep the table, retry
                self.counts["failures"] += 1
                self._handle = None
                log.debug("route exchange failed: %r", e)

    async def sync(self) -> None:
        """Send the buffered outcomes, take the table if it changed."""
        outcomes = tuple(self._buffer)
        self._buffer.clear()
        report = RouteReport(self.holder, self._seen, outcomes)
        try:
            handle = await self._get_handle()
            data = await asyncio.wait_for(handle.exchange.remote(encode(report)), CALL_TIMEOUT_S)
        except BaseException:
            # kept for the next try; past the bound the oldest go
            self._buffer = deque([*outcomes, *self._buffer], maxlen=MAX_BUFFERED)
            raise
        reply = decode(data, RouteReply)
        self.counts["exchanges"] += 1
        if reply.table is not None:
            self.install(reply.table)
        self._seen = reply.version

    async def _get_handle(self):
        if self._handle is None:
            import ray

            from splitserve.cluster.serve.route_actor import NAMESPACE, ROUTES_NAME

            self._handle = await asyncio.to_thread(ray.get_actor, ROUTES_NAME,
                                                   namespace=NAMESPACE)
        return self._handle

    @classmethod
    def for_config(cls, cfg, period_s: float) -> "RouteClient":
        """The client of an ingress deployed with ``cfg`` (a ClusterConfig)."""
        book = RouteBook()
        book.apply([r.policy() for r in cfg.routes])
        return cls(book.table(), servable_names(cfg.models), period_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._buffer:
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
