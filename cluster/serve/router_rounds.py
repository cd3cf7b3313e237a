"""The rounds of each router link: what ``RouterClient`` does for one router.

One task per router ("link", ``LinkState``) batches everything due for that
router into one ``Exchange`` per round trip, at most ``MAX_IN_FLIGHT`` in
flight, the heartbeat's live list only when none is; delivers each call's
outcome (a placement, a refusal, or "queued", followed by a ``poll``); takes
a router down when a call to it fails, moving its requests to their next
router; and notices a router that restarted (a new incarnation: it lost its
queue and slots, so they are sent again). ``LinkRounds`` is the part of
``RouterClient`` that does this; the client holds the state it reads
(leases, pending calls, counters) and its ``_send`` / ``_forget`` /
``_unpark`` / ``_poke``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from splitserve.cluster.serve.choice_staging import exchange_groups
from splitserve.cluster.serve.router_client_state import LinkState, PendingCall
from splitserve.router.exchange import Exchange, ExchangeReply, Outcome, Queued
from splitserve.router.exchange_codec import decode_reply, decode_resolved, encode_exchange
from splitserve.router.types import Placement

log = logging.getLogger("splitserve.router_client")

MAX_BATCH = 512  # calls per exchange
# exchanges per router at once. One: a round trip costs the router far more
# than a placement (about 0.6 ms of CPU for a Ray actor call against 50 us
# per placement, benchmarks/bench_router.py --actor-path), so the largest
# batches win; raise it where round trips are cheap and latency matters more.
MAX_IN_FLIGHT = 1
POLL_S = 1.0  # a poll returns after this long without news (and is sent again)


class LinkRounds:
    async def _run(self, link: LinkState) -> None:
        while not self._closed:
            if not link.up:
                await asyncio.sleep(max(0.0, link.retry_at - time.monotonic()))
                try:
                    await self._exchange(link, [])
                    link.up = True
                    log.info("router %d is back", link.index)
                    self._unpark()
                except Exception:  # noqa: BLE001 - still down
                    link.retry_at = time.monotonic() + self.heartbeat_s
                    link.router.retry_stream()  # its stream too, when it is back
                continue
            if not (link.calls or link.releases or link.suspects):
                try:
                    await asyncio.wait_for(link.wake.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    pass
            link.wake.clear()
            live = time.monotonic() - link.last_live >= self.heartbeat_s
            # a live list must see every earlier reply: it waits until none is
            # in flight; other exchanges overlap up to MAX_IN_FLIGHT
            while link.inflight >= (1 if live else MAX_IN_FLIGHT):
                link.settled.clear()
                await link.settled.wait()
            if not link.up:
                continue
            if not (live or link.calls or link.releases or link.suspects):
                continue
            cut = MAX_BATCH
            while (cut < len(link.calls) and link.calls[cut].group is not None
                   and link.calls[cut].group == link.calls[cut - 1].group):
                cut += 1  # a request's choices travel in one exchange
            calls = [p for p in link.calls[:cut] if not p.dropped]
            del link.calls[:cut]
            link.inflight += 1
            self._loop.create_task(self._round(link, calls, live))

    async def _round(self, link: LinkState, calls: list[PendingCall], live: bool) -> None:
        try:
            reply = await self._exchange(link, calls, live)
        except Exception as e:  # noqa: BLE001 - the router died, restarts or hangs
            if link.up:
                self._link_down(link, calls, e)
            else:
                self._requeue(calls)
            return
        finally:
            link.inflight -= 1
            link.settled.set()
        for p, out in zip(calls, reply.outcomes):
            self._deliver(link, p, out)

    async def _exchange(self, link: LinkState, calls: list[PendingCall],
                        live: bool = True) -> ExchangeReply:
        held = None
        if live:
            leases = self._leases
            held = {lid: leases[lid] for lid in self._acked if lid in leases}
            link.last_live = time.monotonic()
        releases, suspects = tuple(link.releases), tuple(dict.fromkeys(link.suspects))
        link.releases.clear()
        link.suspects.clear()
        for p in calls:
            p.sent = True
        ex = Exchange(holder=self.holder, seen=link.incarnation,
                      calls=tuple(p.call for p in calls), releases=releases,
                      suspects=suspects, live=held, groups=exchange_groups(calls))
        raw, streamed = await link.router.exchange(encode_exchange(ex))
        if streamed:
            self.counts["stream_exchanges"] += 1
        reply = decode_reply(raw)
        self.counts["exchanges"] += 1
        self.counts["calls"] += len(calls)
        if reply.incarnation != link.incarnation:
            restarted = bool(link.incarnation)
            link.incarnation = reply.incarnation
            if restarted:  # it lost its queue and its slots: tell it again
                link.last_live = float("-inf")
                waiting = list(link.queued.values())
                link.queued.clear()
                for p in waiting:
                    p.call = msgspec.structs.replace(p.call, admitted=True)
                self._requeue(waiting)
                self._poke(link)
        return reply

    def _deliver(self, link: LinkState, p: PendingCall, out: Outcome | Queued) -> None:
        lease_id = p.call.lease_id
        if p.future.done() or self._pending.get(lease_id) is not p:
            return  # released or cancelled meanwhile: its release is on its way
        if not isinstance(out, (Queued, Placement)):  # a refusal: the router ended the slot
            self._forget(lease_id)
            p.future.set_exception(out)
            return
        self._acked.add(lease_id)
        if isinstance(out, Queued):
            early = link.early.pop(lease_id, None)
            if early is not None:  # decided while its exchange reply travelled
                self._deliver(link, p, early)
                return
            link.queued[lease_id] = p
            if link.poller is None or link.poller.done():
                link.poller = self._loop.create_task(self._poll(link))
        else:
            p.future.set_result(out)

    async def _poll(self, link: LinkState) -> None:
        while link.queued and link.up and not self._closed:
            try:
                outcomes = decode_resolved(await link.router.poll(self.holder, POLL_S))
            except Exception as e:  # noqa: BLE001
                if link.up:
                    self._link_down(link, [], e)
                return
            for lease_id, out in outcomes:
                p = link.queued.pop(lease_id, None)
                if p is not None:
                    self._deliver(link, p, out)
                elif lease_id in self._pending:  # its "queued" reply is still on its way
                    link.early[lease_id] = out

    def _link_down(self, link: LinkState, in_flight: list[PendingCall], error: BaseException) -> None:
        """Router ``link`` failed: its requests move to their next router."""
        log.warning("router %d unreachable (%r): moving its requests", link.index, error)
        link.up = False
        link.retry_at = time.monotonic() + self.heartbeat_s
        link.router.lost()  # a restarted router listens elsewhere: ask it again
        moved = in_flight + link.calls + list(link.queued.values())
        queued = set(link.queued)
        link.calls.clear()
        link.queued.clear()
        link.early.clear()
        link.releases.clear()  # its replacement learns the slots from the live lists
        link.suspects.clear()
        self.counts["failovers"] += 1
        for p in moved:
            if p.call.lease_id in queued:
                p.call = msgspec.structs.replace(p.call, admitted=True)  # it held a slot there
        self._requeue(moved)

    def _requeue(self, pendings: list[PendingCall]) -> None:
        for p in pendings:
            if not p.dropped and not p.future.done() and self._pending.get(p.call.lease_id) is p:
                self._send(p)
