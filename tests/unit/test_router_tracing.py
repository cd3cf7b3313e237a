"""The router actor's spans (called on its class directly, no Ray), exported
to a real OTLP collector on loopback: a placement, a wait in the queue, a
request given up while it waited, and a refusal."""

import asyncio
import time

import pytest

from splitserve.router.exchange import QUEUED, Exchange, LeaseEnd, RouteCall
from tests.fixtures.otlp_collector import Collector
from tests.unit.test_router_actor import RouterActor, decode, route_req, router_cfg

TRACE = "1f8efff798038103d269b633813fc611"


def parent(i: int) -> str:
    return f"00-{TRACE}-{i:016x}-01"


def call(lease: str, i: int, model="m") -> RouteCall:
    now = time.time()
    return RouteCall(lease_id=lease, request=route_req(lease, model=model, prompt_len=100), arrival=now,
                     waiting_since=now, traceparent=parent(i))


@pytest.fixture
def traced():
    with Collector() as c:
        r = RouterActor.__ray_actor_class__(router_cfg(), tick_s=0, tracing={
            "endpoint": c.endpoint, "schedule_delay_ms": 20})
        try:
            yield r, c
        finally:
            r.tracer.shutdown()


def exchange(r, **kw):
    return asyncio.run(r.exchange(Exchange(holder="ingress", seen=r.service.incarnation, **kw)))


def test_queue_wait_placement_cancel_and_refusal(traced):
    r, collector = traced
    # no decode replica yet: both wait in the queue
    assert exchange(r, calls=(call("a", 1), call("b", 2))).outcomes == (QUEUED, QUEUED)
    exchange(r, releases=(LeaseEnd("b"),))  # b's client gave up
    time.sleep(0.05)
    r.update_stats(decode())  # room: a is placed
    resolved = asyncio.run(r.poll("ingress", 1.0))
    assert [lease for lease, _ in resolved] == ["a"]
    # placed at once: no queue span; an unknown model: a refusal
    placed, refused = exchange(r, calls=(call("c", 3), call("d", 4, model="nope"))).outcomes
    assert placed.decode_replica == "d0"
    r.tracer.flush()
    spans = collector.wait_for(lambda s: len(s) >= 5)
    assert {s.trace_id for s in spans} == {TRACE}
    assert sorted((int(s.parent_id, 16), s.name) for s in spans) == [
        (1, "router.place"), (1, "router.queue"), (2, "router.queue"), (3, "router.place"),
        (4, "router.place")]
    got = {(int(s.parent_id, 16), s.name): s for s in spans}
    queue_a, place_a = got[1, "router.queue"], got[1, "router.place"]
    assert queue_a.end_ns - queue_a.start_ns >= 40_000_000  # it waited the 50 ms
    assert place_a.attributes["splitserve.decode_replica"] == "d0"
    assert place_a.attributes["splitserve.waited_s"] >= 0.04
    assert got[2, "router.queue"].attributes["splitserve.cancelled"] is True
    assert got[3, "router.place"].attributes["splitserve.placement_reason"] == placed.reason
    assert got[4, "router.place"].status == 2
    assert got[4, "router.place"].attributes["error.type"] == "UnknownModelError"
    assert all(s.resource["splitserve.role"] == "router" for s in spans)
