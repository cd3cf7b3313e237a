"""RouterClient: an ingress process's one connection to the routers.

``place`` asks for a (prefill, decode) pair and waits for it; ``release``
and ``suspect`` never wait. Behind them, one task per router ("link",
its rounds in ``router_rounds.LinkRounds``)
batches everything due for that router into one ``Exchange`` per round
trip, with at most ``MAX_IN_FLIGHT`` in flight: while a round trip runs,
the next batch forms, so the request rate a router sustains grows with the
load instead of being one actor call per request and one per release.
Every heartbeat, an exchange carries the list of slots held, sent when no
other is in flight so that it reflects every earlier reply. A request the
router queues is followed by a ``poll`` that returns as soon as the router
decides it. Exchanges, their replies and poll answers travel as msgpack
bytes (``splitserve.router.exchange_codec``): exchanges over a TCP
stream to the router when it offers one (``router_stream``: an actor call
costs the router ten times a round trip there; TLS with ``transfer.tls``),
else as actor calls (``router_link.RouterLink``, the transport of each
link); polls always as actor calls. Operator queries
(readiness, /metrics) go over the same links: ``queries``
(``router_queries.RouterQueries``).

Which router: each model has a fixed order over the routers
(``router_order``, the same in every process: the configured models take
turns being first); its requests go to the first one that is up. A
router whose call fails or times out is down: its
in-flight and queued requests move to the next router at once (keeping
their arrival time, so their place in line and their deadline), and it is
probed again every heartbeat until it answers. While no router is up (all
on a lost node, restarting), calls wait for the first one back, at most
``no_router_wait_s`` and their own deadline, then fail with
RouterUnavailableError (HTTP 503 with Retry-After). Every heartbeat each live
router gets the list of slots this process holds (``Exchange.live``),
which renews them and lets a router that restarted or takes over rebuild
its admission state. The slots of a process that dies expire at the
routers (``RouterConfig.lease_ttl_s``).

A slot is a lease named here (``new_lease``) and held from ``place`` until
``release``; the caller releases on every path (finished, failed,
cancelled while waiting), and a refused request's slot is already gone.

A request's choices (n > 1) are placed as one group (``place``'s
``group``): their calls wait (``choice_staging.ChoiceStaging``) until every
choice has asked (or released), then go to the router in one exchange
(``Exchange.groups``), which admits them all or refuses them all before any
is placed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from typing import Any, Sequence

from splitserve.cluster.serve.choice_staging import ChoiceStaging
from splitserve.cluster.serve.router_client_state import LinkState, PendingCall, link_actor
from splitserve.cluster.serve.router_link import RouterLink
from splitserve.cluster.serve.router_names import router_order
from splitserve.cluster.serve.router_parking import ParkedCalls
from splitserve.cluster.serve.router_queries import RouterQueries
from splitserve.cluster.serve.router_rounds import LinkRounds
from splitserve.router.exchange import LeaseEnd, RouteCall, RouterUnavailableError
from splitserve.handoff.tls import TLSConfig
from splitserve.router.types import Placement, RouteRequest


class RouterClient(LinkRounds):
    def __init__(self, count: int, heartbeat_s: float, models: Sequence[str] = (),
                 call_timeout_s: float = 5.0, handles: Sequence[Any] | None = None,
                 stream: bool = True, tls: TLSConfig | None = None,
                 no_router_wait_s: float = 0.0):
        """``count`` routers (``RouterSpec.routers``); ``heartbeat_s``: how
        often each hears from this process at least (the stats period);
        ``models``: the cluster's models, in config order (``router_order``);
        ``handles``: the router actors, else looked up by name; ``stream``:
        exchanges over the routers' TCP streams (``router_stream``), else
        only as actor calls; ``tls``: this process's ``transfer.tls``, which
        the streams are then dialed with (and must offer);
        ``no_router_wait_s``: how long a call waits for a router while none
        is up (``RouterSpec.no_router_grace_s``; 0: refused at once)."""
        self._models = tuple(models)
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.heartbeat_s = heartbeat_s
        self.call_timeout_s = call_timeout_s
        self._links = [LinkState(i, RouterLink(i, None if handles is None else handles[i],
                                           use_stream=stream, call_timeout_s=call_timeout_s,
                                           tls=tls))
                       for i in range(count)]
        self._orders: dict[str, list[int]] = {}
        self._leases: dict[str, str] = {}  # the slots this process holds: lease id -> model
        # ... of which a router has acknowledged (placed or queued): the live
        # list names only these, so a router never learns a slot from the
        # list before the call that asks for it is counted against the limit
        self._acked: set[str] = set()
        self._home: dict[str, int] = {}  # lease id -> the link its last call went to
        self._pending: dict[str, PendingCall] = {}  # lease id -> its unresolved place()
        self._staging = ChoiceStaging(self._send)  # a request's choices, sent together
        self.no_router_wait_s = no_router_wait_s
        self._parked = ParkedCalls(self._expire)  # waiting while no router is up
        self._seq = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.counts = {"exchanges": 0, "calls": 0, "failovers": 0, "stream_exchanges": 0}
        # operator queries (readiness, /metrics) over the same links
        self.queries = RouterQueries(self._links, link_actor, self._order)

    # -- the ingress' side ------------------------------------------------------------
    def new_lease(self) -> str:
        return f"{self._prefix}-{next(self._seq)}"

    def held(self) -> dict[str, str]:
        """The slots this process holds (lease id -> model)."""
        return dict(self._leases)

    async def place(self, lease_id: str, req: RouteRequest, *, arrival: float,
                    admitted: bool = False, deadline: float | None = None,
                    priority: int = 0, traceparent: str | None = None,
                    resumed: bool = False,
                    group: tuple[str, int] | None = None) -> Placement:
        """Place ``req`` under slot ``lease_id`` (``admitted``: the slot was
        granted before, e.g. a retry; ``resumed``: a stream that produced
        tokens before its decode replica failed, ``RouteCall.resumed``;
        ``traceparent``: the span the router records its work under;
        ``group``: (key, size) of a request's choices, placed all or none:
        the call waits until ``size`` calls of ``key`` asked or released).
        Raises the router's refusal
        (``splitserve.router.types.RouteRefusal``) or RouterUnavailableError.
        The slot is held from here until ``release``."""
        self._start()
        call = RouteCall(lease_id=lease_id, request=req, arrival=arrival,
                         waiting_since=time.time(), deadline=deadline, priority=priority,
                         admitted=admitted or resumed, traceparent=traceparent, resumed=resumed)
        p = PendingCall(call, self._loop.create_future())
        self._leases[lease_id] = req.model
        self._pending[lease_id] = p
        if group is None or group[1] <= 1 or call.admitted:
            self._send(p)
        else:
            self._staging.stage(p, group[0], group[1])
        try:
            return await p.future
        finally:
            if self._pending.get(lease_id) is p:
                del self._pending[lease_id]
                self._parked.drop(p)  # cancelled while no router was up
                if self._staging.holds(p):
                    self._staging.unstage(p)  # cancelled while its siblings were asking
                    self._forget(lease_id)  # no router heard of it

    def release(self, lease_id: str, output_tokens: int = -1) -> None:
        """The request ended (``output_tokens`` produced if it finished, else
        -1): its slot goes back. Never waits; a no-op for a slot not held."""
        model, home = self._leases.get(lease_id), self._home.get(lease_id)
        acked = lease_id in self._acked
        self._forget(lease_id)
        p = self._pending.pop(lease_id, None)
        if model is None:
            return
        if p is not None and self._staging.holds(p):
            self._staging.unstage(p)
        if p is not None:
            self._parked.drop(p)
        if p is not None and not p.sent:
            p.dropped = True  # its call is not sent now
            if not acked:
                return  # it never reached a router: nothing to give back
        for i in {home, self._current(model)}:
            if i is None:
                continue
            link = self._links[i]
            link.queued.pop(lease_id, None)
            link.early.pop(lease_id, None)
            if link.up:
                # a router that did not place it may know it only from a live list
                link.releases.append(LeaseEnd(lease_id, output_tokens, elsewhere=i != home))
                self._poke(link)

    def withdraw(self, group: tuple[str, int]) -> None:
        """A choice of ``group`` (``place``'s) ended before it asked: its
        siblings do not wait for it (``ChoiceStaging.withdraw``)."""
        self._staging.withdraw(group)

    def suspect(self, replica_id: str) -> None:
        """An RPC to this replica failed: tell every router (never waits)."""
        for link in self._links:
            if link.up:
                link.suspects.append(replica_id)
                self._poke(link)

    async def close(self) -> None:
        """Send what is due (releases) once more, then stop."""
        if self._loop is not asyncio.get_running_loop():
            return
        for link in self._links:
            if link.up and (link.releases or link.suspects):
                try:
                    await self._exchange(link, [])
                except Exception:  # noqa: BLE001 - best effort: the slots expire anyway
                    pass
        self._closed = True
        for p in self._parked.drain():
            self._unavailable(p, "the ingress is shutting down")
        for link in self._links:
            for t in (link.task, link.poller):
                if t is not None:
                    t.cancel()
            link.router.drop_stream()
        self._loop = None

    # -- routing ------------------------------------------------------------------------
    def _order(self, model: str) -> list[int]:
        order = self._orders.get(model)
        if order is None:
            order = self._orders[model] = router_order(model, len(self._links), self._models)
        return order

    def _current(self, model: str) -> int | None:
        for i in self._order(model):
            if self._links[i].up:
                return i
        return None

    def _forget(self, lease_id: str) -> None:
        """This process no longer holds the slot (released, or refused)."""
        self._leases.pop(lease_id, None)
        self._acked.discard(lease_id)
        self._home.pop(lease_id, None)

    def _send(self, p: PendingCall) -> None:
        model = p.call.request.model
        i = self._current(model)
        if i is None:
            self._park(p)
            return
        link = self._links[i]
        p.link, p.sent = i, False
        self._home[p.call.lease_id] = i
        link.calls.append(p)
        self._poke(link)

    def _park(self, p: PendingCall) -> None:
        """No router is up for ``p``'s model (all are restarting: Ray brings a
        lost one back on another node once it notices the loss): ``p`` waits
        for the first one back, at most ``no_router_wait_s`` and never past
        its own deadline, then fails with RouterUnavailableError."""
        wait = self.no_router_wait_s
        if p.call.deadline is not None:
            wait = min(wait, p.call.deadline - time.time())
        if wait <= 0 or self._closed or self._parked.full():
            self._unavailable(p, f"no router is up for model {p.call.request.model!r}: "
                                 "they are restarting; retry shortly")
            return
        p.link, p.sent = -1, False
        self._parked.park(self._loop, p, wait)

    def _expire(self, p: PendingCall, waited: float) -> None:
        self._unavailable(p, f"no router came back for model {p.call.request.model!r} "
                             f"within {waited:.3g} s; retry shortly")

    def _unavailable(self, p: PendingCall, why: str) -> None:
        if not p.dropped and not p.future.done() and self._pending.get(p.call.lease_id) is p:
            self._forget(p.call.lease_id)
            p.future.set_exception(RouterUnavailableError(why))

    def _unpark(self) -> None:
        """A router is back: the parked calls go to it (in arrival order)."""
        self._requeue(self._parked.drain())

    def _poke(self, link: LinkState) -> None:
        if link.wake is not None:
            link.wake.set()

    def _start(self) -> None:
        """Start the link tasks on this event loop (again, if the caller
        moved to a new loop: what belonged to the old one has ended)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError("RouterClient is already used by another running event loop; "
                               "make one RouterClient per loop")
        self._loop, self._closed = loop, False
        self._leases.clear()
        self._acked.clear()
        self._home.clear()
        self._pending.clear()
        self._staging.clear()
        self._parked.forget()  # the old loop's timers ended with it
        for link in self._links:
            link.calls.clear()
            link.queued.clear()
            link.early.clear()
            link.wake = asyncio.Event()
            link.settled = asyncio.Event()
            link.inflight = 0
            link.poller = None
            link.router.start()  # the old loop's stream, if any, ended with it
            link.task = loop.create_task(self._run(link))
