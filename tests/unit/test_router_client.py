"""RouterClient against router actors called in process (no Ray): batching,
slots released on every path, failover to the next router."""

import asyncio
import time

import pytest

from splitserve.cluster.serve.router_actor import RouterActor
from splitserve.cluster.serve.router_client import RouterClient, RouterUnavailableError
from splitserve.cluster.serve.router_names import router_order
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.types import OverloadedError, Placement, RouteRequest
from tests.unit.test_router_actor import decode, prefill


class _Method:
    def __init__(self, router: "FakeRouter", name: str):
        self.router, self.name = router, name

    def remote(self, *args):
        async def call():
            await asyncio.sleep(0)  # a round trip: other coroutines run meanwhile
            if self.router.dead:
                raise ConnectionError("actor died")
            self.router.calls[self.name] = self.router.calls.get(self.name, 0) + 1
            out = getattr(self.router.actor, self.name)(*args)
            out = await out if asyncio.iscoroutine(out) else out
            if self.name == "exchange":
                await asyncio.sleep(self.router.reply_delay_s)  # a slow way back
            return out
        return call()


class FakeRouter:
    """A router actor's handle: ``.exchange.remote(...)`` and ``.poll.remote(...)``."""

    def __init__(self, models=("m",), **cfg):
        cfg = RouterConfig(policy="least_loaded", models={m: ModelFacts(16, 1000) for m in models},
                           **cfg)
        self.actor = RouterActor.__ray_actor_class__(cfg, tick_s=0)
        self.actor.update_stats(prefill())
        self.actor.update_stats(decode())  # 8 batch slots, 100 blocks of 16
        self.dead = False
        self.reply_delay_s = 0.0
        self.calls = {"exchange": 0, "poll": 0}
        self.exchange = _Method(self, "exchange")
        self.poll = _Method(self, "poll")
        self.live_replicas = _Method(self, "live_replicas")

    def counters(self):
        return self.actor.counters()


def req(i: int) -> RouteRequest:
    return RouteRequest(f"r{i}", "m", 32, 8, block_hashes=())


async def place(client: RouterClient, i: int, hold_s: float = 0.0, **kw) -> Placement:
    lease = client.new_lease()
    out = -1
    try:
        p = await client.place(lease, req(i), arrival=time.time(), **kw)
        await asyncio.sleep(hold_s)
        out = 8
        return p
    finally:
        client.release(lease, out)


def test_concurrent_requests_share_round_trips_and_every_slot_comes_back():
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=0.05, handles=[router])

    async def main():
        # 24 requests, 8 batch slots: 16 wait and are placed as slots free
        got = await asyncio.gather(*(place(client, i, hold_s=0.01) for i in range(24)))
        assert all(p.decode_replica == "d0" for p in got)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert c["in_flight"] == {"m": 0} and c["unbalanced_releases"] == 0
    assert c["queued_total"] > 0
    assert router.calls["exchange"] < 24  # batched: far fewer round trips than requests


def test_a_client_that_leaves_while_waiting_frees_its_slot():
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=0.05, handles=[router])

    async def main():
        holders = [asyncio.ensure_future(place(client, i, hold_s=10)) for i in range(8)]
        waiting = [asyncio.ensure_future(place(client, 100 + i)) for i in range(4)]
        await asyncio.sleep(0.05)
        assert router.counters()["queued"] == {"m": 4}
        for t in waiting + holders:
            t.cancel()  # the clients disconnect: 4 while waiting, 8 while streaming
        await asyncio.gather(*waiting, *holders, return_exceptions=True)
        await asyncio.sleep(0.1)  # the releases ride the next exchange
        assert client.held() == {}
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["queued"], c["unbalanced_releases"]) == ({"m": 0}, {"m": 0}, 0)


def test_refused_requests_hold_no_slot():
    router = FakeRouter(max_queue_per_model=2)
    client = RouterClient(1, heartbeat_s=0.05, handles=[router])

    async def main():
        results = await asyncio.gather(*(place(client, i, hold_s=0.05) for i in range(3)),
                                       return_exceptions=True)
        assert sum(isinstance(r, OverloadedError) for r in results) == 1
        await asyncio.sleep(0.1)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)


def test_requests_move_to_the_next_router_when_theirs_dies():
    first, second = router_order("m", 2)
    routers = [FakeRouter(), FakeRouter()]
    client = RouterClient(2, heartbeat_s=0.05, handles=routers)

    async def main():
        running = [asyncio.ensure_future(place(client, i, hold_s=0.3)) for i in range(8)]
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(place(client, 100 + i)) for i in range(2)]
        await asyncio.sleep(0.15)  # heartbeats carry the held slots to the standby too
        assert routers[first].counters()["queued"] == {"m": 2}
        assert routers[second].counters()["in_flight"] == {"m": 10}  # learned, not placed
        routers[first].dead = True
        done = await asyncio.gather(*running, *waiting)
        assert len(done) == 10
        await asyncio.sleep(0.15)
        await client.close()

    asyncio.run(main())
    c = routers[second].counters()
    assert (c["in_flight"], c["unbalanced_releases"], c["leases_reclaimed"]) == ({"m": 0}, 0, 0)
    assert c["decisions"] == 2 and client.counts["failovers"] >= 1


class Recording(dict):
    def __init__(self):
        super().__init__()
        self.keys_set = []

    def __setitem__(self, key, value):
        self.keys_set.append(key)
        super().__setitem__(key, value)


def test_an_outcome_polled_before_its_queued_reply_arrives_is_not_lost():
    second_lease = []
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        holders = [asyncio.ensure_future(place(client, i, hold_s=10)) for i in range(8)]
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(place(client, 100))  # queued: a poll runs for it
        await asyncio.sleep(0.05)
        router.reply_delay_s = 0.3
        second = asyncio.ensure_future(place(client, 101))  # queued, its reply slow
        second_lease.append(f"{client._prefix}-{9}")
        await asyncio.sleep(0.05)
        # the replica reports free slots while the reply travels: the poll
        # brings both outcomes before it
        early = client._links[0].early = Recording()
        router.actor.update_stats(decode())
        router.reply_delay_s = 0.0
        got = await asyncio.wait_for(asyncio.gather(first, second), 2.0)
        assert early.keys_set == [second_lease[0]]
        assert all(p.decode_replica == "d0" for p in got)
        for t in holders:
            t.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await asyncio.sleep(0.1)
        await client.close()

    asyncio.run(main())
    assert router.counters()["in_flight"] == {"m": 0}


def test_no_router_up_is_unavailable():
    router = FakeRouter()
    router.dead = True
    client = RouterClient(1, heartbeat_s=0.05, handles=[router])

    async def main():
        with pytest.raises(RouterUnavailableError):
            await place(client, 0)
            await place(client, 1)
        await client.close()

    asyncio.run(main())


def test_calls_wait_for_a_router_that_comes_back():
    router = FakeRouter()
    router.dead = True
    client = RouterClient(1, heartbeat_s=0.05, handles=[router], no_router_wait_s=10.0)

    async def main():
        waiting = [asyncio.ensure_future(place(client, i)) for i in range(3)]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in waiting) and len(client._parked) == 3
        router.dead = False  # restarted
        got = await asyncio.wait_for(asyncio.gather(*waiting), 2.0)
        assert all(p.decode_replica == "d0" for p in got)
        assert not client._parked and client._parked.total >= 3
        await asyncio.sleep(0.15)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"], c["decisions"]) == ({"m": 0}, 0, 3)


def test_a_parked_call_ends_at_its_wait_or_its_deadline_and_a_cancelled_one_is_dropped():
    router = FakeRouter()
    router.dead = True
    client = RouterClient(1, heartbeat_s=0.05, handles=[router], no_router_wait_s=0.3)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(RouterUnavailableError, match="within 0.3 s"):
            await place(client, 0)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        client.no_router_wait_s = 30.0
        t0 = time.monotonic()
        with pytest.raises(RouterUnavailableError):
            await place(client, 1, deadline=time.time() + 0.2)  # the client's own deadline
        assert time.monotonic() - t0 < 2.0
        cancelled = asyncio.ensure_future(place(client, 2))
        await asyncio.sleep(0.1)
        assert len(client._parked) == 1
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert not client._parked and not client.held()
        router.dead = False
        assert (await place(client, 3)).decode_replica == "d0"
        await asyncio.sleep(0.15)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"], c["decisions"]) == ({"m": 0}, 0, 1)
