"""The ingress side of routes (splitserve.cluster.api.routing): a route
resolves to one of its variants by the client key, variants the ingress
does not serve are left out, and ``track`` reports how a routed stream
ended (server errors count; client errors, overload and abandoned requests
do not)."""

import asyncio
import random

import pytest

from splitserve.cluster.api.backend import ModelInfo, Overloaded, Unavailable
from splitserve.cluster.api.routing import Routed, Routing
from splitserve.engine.errors import InvalidRequestError
from splitserve.router.route_messages import RouteTable, RouteWeights
from tests.fixtures.routing import RecordingRouting as Kept

TABLE = RouteTable(3, (RouteWeights("chat", ("a", "b", "c"), (1.0, 1.0, 2.0), "x-user"),))


def test_resolve_uses_the_header_key_and_leaves_other_models_alone():
    r = Routing(TABLE, served={"a", "b", "c"}, rng=random.Random(0))
    assert r.resolve("a", lambda h: None) == Routed("a", "a")
    got = r.resolve("chat", lambda h: "alice" if h == "x-user" else None)
    assert got.route == "chat" and got.requested == "chat" and got.model in "abc"
    assert all(r.resolve("chat", lambda h: "alice").model == got.model for _ in range(20))


def test_variants_not_served_here_are_left_out():
    r = Routing(TABLE, served={"a", "c"})
    assert r.table.get("chat").variants == ("a", "c") and r.table.version == 3
    assert Routing(TABLE, served={"z"}).table.get("chat") is None
    cards = r.model_cards([ModelInfo("a", 128, 5), ModelInfo("c", 64, 7)])
    assert cards == [ModelInfo("chat", 64, 5)]


async def outputs(n, then=None):
    for i in range(n):
        await asyncio.sleep(0)
        yield {"token_ids": [i], "finished": i == n - 1 and then is None}
    if then is not None:
        raise then


def run_track(stream, close_after=None):
    r = Kept(TABLE)

    async def main():
        got = 0
        tracked = r.track(Routed("chat", "b", "chat"), stream)
        try:
            async for _ in tracked:
                got += 1
                if close_after is not None and got == close_after:
                    break
        finally:
            await tracked.aclose()

    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - the stream's own error, as a client sees it
        return r.outcomes, e
    return r.outcomes, None


def test_a_finished_stream_is_ok_with_its_latencies():
    (o,), err = run_track(outputs(4))
    assert err is None and (o.route, o.variant, o.ok) == ("chat", "b", True)
    assert o.ttft_s >= 0 and o.tpot_s >= 0


@pytest.mark.parametrize("error,counted", [
    (Unavailable("replica gone"), True),
    (RuntimeError("boom"), True),
    (InvalidRequestError("bad", param="x"), False),
    (Overloaded("full", 1.0), False),
])
def test_errors_count_only_when_they_are_the_servers(error, counted):
    outcomes, err = run_track(outputs(2, then=error))
    assert err is error
    assert [o.ok for o in outcomes] == ([False] if counted else [])


def test_a_client_that_leaves_is_not_an_outcome_but_one_that_got_all_is():
    outcomes, _ = run_track(outputs(5), close_after=2)
    assert outcomes == []
    outcomes, _ = run_track(outputs(3), close_after=3)  # closed after the finished output
    assert [o.ok for o in outcomes] == [True]


def test_an_unfinished_end_is_an_error():
    async def cut():
        yield {"token_ids": [1], "finished": False}

    (o,), _ = run_track(cut())
    assert not o.ok and o.tpot_s == -1.0
