"""Batching on the ingress-router path: concurrent placements of one
ingress share one exchange; a member cancelled while its exchange is on
the way gives its slot back; within a batch the router serves requests
in queue order (resumed, priority, arrival). Router actors called in
process (no Ray)."""

import asyncio
import time

from splitserve.cluster.serve.router_client import RouterClient
from tests.unit.test_router_client import FakeRouter, place, req


def test_a_batch_member_cancelled_in_flight_gives_its_slot_back():
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        await place(client, 99)  # the first exchange (and its heartbeat) is behind us
        before = router.calls["exchange"]
        router.reply_delay_s = 0.1  # the batch's reply is slow
        batch = [asyncio.ensure_future(place(client, i, hold_s=10)) for i in range(4)]
        await asyncio.sleep(0.03)
        assert router.calls["exchange"] == before + 1  # the 4 calls went in one exchange
        assert router.counters()["in_flight"] == {"m": 4}  # each took a slot there
        batch[2].cancel()  # its client leaves while the reply travels
        router.reply_delay_s = 0.0
        await asyncio.sleep(0.2)  # the reply, then the release in the next exchange
        assert batch[2].cancelled()
        assert not any(t.done() for t in batch[:2] + batch[3:])  # placed, streaming
        assert router.counters()["in_flight"] == {"m": 3}
        assert len(client.held()) == 3
        for t in batch:
            t.cancel()
        await asyncio.gather(*batch, return_exceptions=True)
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)


def test_a_batch_is_served_in_queue_order_not_in_the_order_it_was_sent():
    router = FakeRouter()  # 8 batch slots
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])
    order: list[str] = []

    async def one(name: str, **kw):
        lease = client.new_lease()
        try:
            await client.place(lease, req(len(order) + 100), arrival=time.time(), **kw)
            order.append(name)
            await asyncio.sleep(10)
        finally:
            client.release(lease, 8)

    async def main():
        holders = [asyncio.ensure_future(place(client, i, hold_s=10)) for i in range(7)]
        await asyncio.sleep(0.05)  # one seat left
        before = router.calls["exchange"]
        batch = [asyncio.ensure_future(one("batch job", priority=5)),
                 asyncio.ensure_future(one("interactive", priority=-1)),
                 asyncio.ensure_future(one("resumed", resumed=True))]
        await asyncio.sleep(0.05)
        assert router.calls["exchange"] == before + 1  # one exchange
        assert order == ["resumed"]  # the one seat: the resumed stream, though sent last
        holders[0].cancel()
        await asyncio.sleep(0.1)
        assert order == ["resumed", "interactive"]
        holders[1].cancel()
        await asyncio.sleep(0.1)
        assert order == ["resumed", "interactive", "batch job"]
        for t in holders + batch:
            t.cancel()
        await asyncio.gather(*holders, *batch, return_exceptions=True)
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)
