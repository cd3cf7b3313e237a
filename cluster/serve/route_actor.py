"""The route controller: one small named Ray actor holding the cluster's
routes (``splitserve.router.route_book.RouteBook``) and driving their ramps.

  splitserve deploy -> apply(RoutePolicy ...)   the operator's routes, as edited
  each ingress      -> exchange(RouteReport)    every period: its routed requests'
                    <- RouteReply                outcomes; the weights when changed
  a tick every TICK_S                           each ramp judges its step
  splitserve status -> status()                 weights, steps, guard readings, moves

Messages travel msgpack-encoded (``splitserve.router.route_messages``). The
book's state (policies, each ramp's step, status and events, the table
version) is written to Ray's internal key-value store after every apply and
every move, so a restarted controller resumes each ramp at its step; the
observations of the step in progress are not kept (they start over, and
the step's hold time counts from its original start). Ingresses keep
serving the weights they hold while the controller is away.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from splitserve.cluster.serve.ticker import Ticker
from splitserve.router.route_book import RouteBook
from splitserve.router.route_messages import (
    BookState,
    RoutePolicy,
    RouteReply,
    RouteReport,
    decode,
    encode,
)

log = logging.getLogger("splitserve.routes")

ROUTES_NAME = "splitserve-routes"
NAMESPACE = "splitserve"
TICK_S = 1.0
HOLDER_TTL_S = 10.0  # an ingress silent this long is no longer listed by ``holders``
_KV_KEY = b"routes_state"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def load_state() -> BookState | None:
    data = _kv()._internal_kv_get(_KV_KEY, namespace=NAMESPACE)
    if data is None:
        return None
    try:
        return decode(data, BookState)
    except Exception:  # noqa: BLE001 - a state from an incompatible version: start clean
        log.exception("route state in the key-value store is unreadable; starting clean")
        return None


def clear_state() -> None:
    _kv()._internal_kv_del(_KV_KEY, namespace=NAMESPACE)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)
class RouteActor:
    def __init__(self, tick_s: float = TICK_S):
        self.book = RouteBook(time.time, load_state())
        self._ticker = Ticker(tick_s, self._tick, log, "route")
        self._holders: dict[str, tuple[int, float]] = {}  # holder -> (version seen, when)

    def _persist(self) -> None:
        _kv()._internal_kv_put(_KV_KEY, encode(self.book.state()), overwrite=True,
                               namespace=NAMESPACE)

    def _tick(self) -> None:
        moves = self.book.tick()
        for route, ev in moves:
            log.warning("route %s: %s %g%% -> %g%%: %s", route, ev.kind, ev.from_percent,
                        ev.to_percent, ev.reason)
        if moves:
            self._persist()

    async def ready(self) -> int:
        self._ticker.ensure()
        return self.book.version

    async def apply(self, data: bytes) -> tuple[int, list[str]]:
        """Install the operator's routes (msgpack ``tuple[RoutePolicy, ...]``);
        returns (table version, what changed)."""
        self._ticker.ensure()
        lines = self.book.apply(decode(data, tuple[RoutePolicy, ...]))
        self._persist()
        return self.book.version, lines

    async def exchange(self, data: bytes) -> bytes:
        """An ingress's ``RouteReport``; answers a ``RouteReply``."""
        self._ticker.ensure()
        report = decode(data, RouteReport)
        self.book.record(report.outcomes)
        version = self.book.version
        self._holders[report.holder] = (report.seen, time.monotonic())
        # a table sent now counts as held from the holder's next report
        table = self.book.table() if report.seen != version else None
        return encode(RouteReply(version, table))

    async def holders(self) -> dict[str, int]:
        """The ingresses heard from lately -> the table version each holds."""
        horizon = time.monotonic() - HOLDER_TTL_S
        self._holders = {h: v for h, v in self._holders.items() if v[1] >= horizon}
        return {h: v[0] for h, v in self._holders.items()}

    async def status(self) -> list[dict[str, Any]]:
        self._ticker.ensure()
        return self.book.status()

    async def tick_now(self) -> None:
        """One tick at once (the operator asks for a fresh reading)."""
        self._tick()


def get_route_actor(create: bool = False):
    """The route controller's handle; created (detached) when ``create``."""
    try:
        return ray.get_actor(ROUTES_NAME, namespace=NAMESPACE)
    except ValueError:
        if not create:
            raise
    return RouteActor.options(name=ROUTES_NAME, namespace=NAMESPACE, lifetime="detached",
                              get_if_exists=True).remote()


def apply_routes(policies: list[RoutePolicy]) -> tuple[int, list[str]]:
    """Hand the operator's routes to the controller (created if missing);
    returns (table version, what changed). Needs a connected Ray driver."""
    actor = get_route_actor(create=True)
    return ray.get(actor.apply.remote(encode(tuple(policies))))


def wait_for_ingresses(version: int, wait_s: float) -> list[str]:
    """Wait until every ingress heard from lately holds table ``version``
    (or later); returns those that do not after ``wait_s``."""
    actor = get_route_actor()
    deadline = time.monotonic() + wait_s
    while True:
        behind = [h for h, v in ray.get(actor.holders.remote()).items() if v < version]
        if not behind or time.monotonic() > deadline:
            return behind
        time.sleep(0.1)


def kill_route_actor() -> None:
    """Remove the controller and its persisted state (the cluster is shut down)."""
    try:
        ray.kill(ray.get_actor(ROUTES_NAME, namespace=NAMESPACE))
    except ValueError:
        pass
    try:
        clear_state()
    except Exception:  # noqa: BLE001 - not connected: nothing persisted here
        pass
