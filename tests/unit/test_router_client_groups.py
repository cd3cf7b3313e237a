"""A request's choices through the ingress' RouterClient: they wait for one
another and travel in one exchange, admitted all or none; a choice that
ends before asking, or is cancelled while its siblings ask, does not hold
them back. Router actors called in process (no Ray)."""

import asyncio

import pytest

from splitserve.cluster.serve.router_client import RouterClient
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.types import OverloadedError
from tests.unit.test_router_client import FakeRouter, place


def test_choices_that_do_not_fit_together_are_all_refused_and_take_no_slot():
    router = FakeRouter(max_queue_per_model=3)
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        holders = [asyncio.ensure_future(place(client, i, hold_s=10)) for i in range(2)]
        await asyncio.sleep(0.05)
        before = router.calls["exchange"]
        first = asyncio.ensure_future(place(client, 10, group=("g", 2)))
        await asyncio.sleep(0.05)
        assert router.calls["exchange"] == before  # it waits for its sibling
        second = asyncio.ensure_future(place(client, 11, group=("g", 2)))
        outs = await asyncio.gather(first, second, return_exceptions=True)
        assert router.calls["exchange"] == before + 1  # both in one exchange
        assert all(isinstance(o, OverloadedError) and o.needed == 2 for o in outs), outs
        assert router.counters()["in_flight"] == {"m": 2}
        assert len(client.held()) == 2
        await place(client, 12)  # the free slot was free all along
        for t in holders:
            t.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)


def test_choices_that_fit_are_all_placed_and_give_their_slots_back():
    router = FakeRouter(max_queue_per_model=3)
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        outs = await asyncio.gather(*(place(client, i, group=("g", 3)) for i in range(3)))
        assert len({o.decode_replica for o in outs}) == 1
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)


@pytest.mark.parametrize("how", ["withdrawn", "cancelled"])
def test_a_choice_gone_before_its_group_was_sent_does_not_hold_the_others(how):
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        first = asyncio.ensure_future(place(client, 0, group=("g", 3)))
        await asyncio.sleep(0.02)
        if how == "withdrawn":  # a choice that failed before it asked
            client.withdraw(("g", 3))
        else:  # a choice cancelled while waiting for its siblings
            gone = asyncio.ensure_future(place(client, 1, group=("g", 3)))
            await asyncio.sleep(0.02)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        assert not first.done()
        last = asyncio.ensure_future(place(client, 2, group=("g", 3)))
        await asyncio.wait_for(asyncio.gather(first, last), 2.0)
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)
    assert router.actor.counters()["in_flight"] == {"m": 0}


def test_a_choice_that_asks_after_its_only_waiting_sibling_was_cancelled_is_not_held():
    # the group's one staged call left; a sibling asking later must not wait
    # for it (nor for a fresh group of the full size) until its deadline
    router = FakeRouter()
    client = RouterClient(1, heartbeat_s=10.0, handles=[router])

    async def main():
        gone = asyncio.ensure_future(place(client, 0, group=("g", 2)))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        await asyncio.wait_for(place(client, 1, group=("g", 2)), 2.0)
        await asyncio.sleep(0.05)
        await client.close()

    asyncio.run(main())
    c = router.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 0)


@pytest.mark.parametrize("model, params", [
    ("nope", SamplingParams(max_tokens=4)),  # an unknown model: 404
    ("a", SamplingParams(max_tokens=1 << 20)),  # past the context: 400
])
def test_a_choice_refused_before_it_asks_does_not_hold_its_siblings(tiny_checkpoints, model,
                                                                   params):
    from splitserve.cluster.api.backend import RequestOptions
    from splitserve.cluster.config import parse_config
    from splitserve.cluster.serve.orchestrator import ClusterBackend
    from tests.integration.test_isolation import ScriptedRouter

    cfg = parse_config({"models": [{"model": {"name": "a", "path": str(
        tiny_checkpoints["llama"])}}]})
    router = ScriptedRouter("prefill", ["decode"])
    backend = ClusterBackend(cfg, router=router, token="unit-test-token")
    gen = backend.generate(model, "r-0", [1, 2, 3], params, RequestOptions(choices=("r", 2)))
    with pytest.raises(Exception):
        asyncio.run(gen.__anext__())
    assert router.withdrawn == [("r", 2)] and router.placements == []
