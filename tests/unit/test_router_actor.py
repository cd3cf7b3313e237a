"""The router actor's methods, called on its class directly (no Ray): the
replies workers and ingresses act on."""

import asyncio
import pickle
import time

import pytest

from splitserve.cluster.serve.router_actor import RouterActor
from splitserve.engine.roles import Role
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.exchange import QUEUED, Exchange, LeaseEnd, RouteCall
from splitserve.router.reports import ReplicaInfo, StatsReport
from splitserve.router.types import (
    InvalidStatsError,
    NoCapacityError,
    OverloadedError,
    Placement,
    QueueDelayError,
    RouteRequest,
    UnknownModelError,
)
from tests.fixtures.worker_stats import decode_stats, engine_load, prefill_stats

def Router(cfg: RouterConfig):
    return RouterActor.__ray_actor_class__(cfg, tick_s=0)  # no background ticks


def router_cfg(**kw) -> RouterConfig:
    return RouterConfig(policy="cost", models={"m": ModelFacts(16, 1000)}, **kw)


def route(r, req: RouteRequest, admitted=False, max_queue_delay_s=None):
    """One call in one exchange, as an ingress sends it; the outcome."""
    now = time.time()
    call = RouteCall(lease_id=req.request_id, request=req, arrival=now, waiting_since=now,
                     admitted=admitted)
    ex = Exchange(holder="ingress", seen=r.service.incarnation, calls=(call,))
    return asyncio.run(r.exchange(ex)).outcomes[0]


def release(r, lease_id: str, tokens=-1):
    ex = Exchange(holder="ingress", seen=r.service.incarnation,
                  releases=(LeaseEnd(lease_id, tokens),))
    asyncio.run(r.exchange(ex))


def report(stats, role: Role, rid: str, stored=(), evicted=(), snapshot=False) -> StatsReport:
    return StatsReport(
        replica=ReplicaInfo(replica_id=rid, role=role, model="m", kv_endpoint="", node_id="n1"),
        stats=stats, healthy=True, draining=False, updated_at=time.time(),
        stored=tuple(stored), evicted=tuple(evicted), snapshot=snapshot)


def prefill(rid="p0", pending=0, **kw):
    # 1 s of engine time for 10k prompt tokens: 10k tokens/s
    load = engine_load(pending_prompt_tokens=pending, prompt_tokens_computed=10000,
                       busy_time_s=1.0)
    return report(prefill_stats(load), Role.PREFILL, rid, **kw)


def decode(rid="d0", role=Role.DECODE):
    load = engine_load(free_blocks=100, total_blocks=100, max_seqs=8, block_size=16,
                       busy_time_s=0.5, steps=50)
    return report(decode_stats(load), role, rid)


def route_req(rid="r", model="m", prompt_len=1000):
    return RouteRequest(rid, model, prompt_len=prompt_len, max_tokens=4, block_hashes=())


def test_push_reply_asks_an_unknown_replica_for_a_snapshot_of_its_cache():
    r = Router(router_cfg())
    assert r.update_stats(prefill(stored=[1, 2, 3])) is True  # a delta from a stranger
    assert r.update_stats(prefill(stored=[4])) is False
    assert r.cached_blocks() == {"p0": 4}
    # the snapshot replaces what deltas built up
    assert r.update_stats(prefill(stored=[2, 9], snapshot=True)) is False
    assert r.cached_blocks() == {"p0": 2}
    # a reconfigure forgets everything: the next push is answered with a request again
    r.reconfigure(router_cfg())
    assert r.update_stats(prefill()) is True
    assert r.update_stats(prefill(stored=[2, 9], snapshot=True)) is False
    assert r.cached_blocks() == {"p0": 2}


def test_queue_delay_refusal_is_overloaded_with_retry_after_and_frees_the_slot():
    r = Router(router_cfg(max_queue_delay_s=0.5, max_queue_per_model=1))
    r.update_stats(prefill(pending=8000))  # 0.8 s of queue at 10k tokens/s
    r.update_stats(decode())
    res = pickle.loads(pickle.dumps(route(r, route_req())))  # as it crosses to the caller
    assert type(res) is QueueDelayError and "max_queue_delay_s" in str(res)
    assert (res.model, abs(res.retry_after_s - 0.3) < 0.05) == ("m", True)
    c = r.counters()
    assert (c["queue_delay"], c["in_flight"]) == (1, {"m": 0})  # the admission slot came back
    assert c["refusals"] == {"queue_delay": 1}
    # a request already admitted (a retry or a resumed stream) is still placed
    placed = route(r, route_req("resumed"), admitted=True)
    assert (placed.prefill_replica, placed.decode_replica) == ("p0", "d0")


def test_refusals_are_returned_as_typed_errors():
    r = Router(router_cfg(max_queue_per_model=1))
    res = route(r, route_req(model="nope"))
    assert type(res) is UnknownModelError and (res.model, res.known) == ("nope", ("m",))
    assert route(r, route_req("w")) == QUEUED
    release(r, "w")  # no decode replica yet: it waited; its client left
    r.update_stats(prefill())
    r.update_stats(decode())
    assert isinstance(route(r, route_req("a")), Placement)
    res = pickle.loads(pickle.dumps(route(r, route_req("b"))))  # the one slot is taken
    assert type(res) is OverloadedError
    assert (res.model, res.in_flight, res.limit) == ("m", 1, 1) and res.retry_after_s > 0
    release(r, "a", tokens=4)
    release(r, "a", tokens=4)  # twice: counted, not hidden
    c = r.counters()
    assert (c["in_flight"], c["unbalanced_releases"]) == ({"m": 0}, 1)


def test_a_queued_request_is_answered_by_poll_when_a_replica_frees():
    r = Router(router_cfg(max_queue_per_model=16))
    r.update_stats(prefill())
    r.update_stats(decode())  # 8 batch slots
    outs = [route(r, route_req(f"r{i}", prompt_len=100)) for i in range(9)]
    assert all(isinstance(o, Placement) for o in outs[:8]) and outs[8] == QUEUED
    assert asyncio.run(r.poll("ingress", 0.01)) == []  # nothing yet: the poll times out

    async def poll_then_release():
        waiting = asyncio.ensure_future(r.poll("ingress", 5.0))
        await asyncio.sleep(0)
        await r.exchange(Exchange(holder="ingress", releases=(LeaseEnd("r0", 3),)))
        return await asyncio.wait_for(waiting, 1.0)

    [(lease, placement)] = asyncio.run(poll_then_release())
    assert lease == "r8" and placement.decode_replica == "d0"


def test_reports_become_the_router_view_of_each_pool():
    r = Router(router_cfg())
    r.update_stats(prefill(pending=30))
    r.update_stats(decode("d0"))
    r.update_stats(decode("c0", role=Role.COLOCATED))  # colocated replicas join the decode pool
    reps = r.replicas()["m"]
    assert reps["prefill"] == [dict(
        replica_id="p0", model="m", pending_prompt_tokens=30, running_requests=0,
        prefill_tokens_per_s=10000.0, healthy=True, draining=False, node_id="n1",
        updated_at=reps["prefill"][0]["updated_at"], adapters=[], host_adapters=[],
        queue_s=0.003)]
    assert [(d["replica_id"], d["free_blocks"], d["max_seqs"], d["block_size"], d["decode_step_s"])
            for d in reps["decode"]] == [("c0", 100, 8, 16, 0.01), ("d0", 100, 8, 16, 0.01)]
    assert {rid: i.role for rid, i in r.replicas_info.items()} == {
        "p0": Role.PREFILL, "d0": Role.DECODE, "c0": Role.COLOCATED}


def test_stats_of_the_wrong_pool_are_refused():
    r = Router(router_cfg())
    wrong = report(prefill_stats(), Role.COLOCATED, "c0")
    with pytest.raises(InvalidStatsError, match="colocated replica but pushed PrefillStats"):
        r.update_stats(wrong)
    assert r.replicas()["m"] == {"prefill": [], "decode": []}


def test_the_backend_answers_each_refusal_with_its_client_error():
    from splitserve.cluster.api.backend import Overloaded, Unavailable, UnknownModel
    from splitserve.cluster.serve.orchestrator import ClusterBackend

    be = ClusterBackend.__new__(ClusterBackend)  # no checkpoints: only the mapping is used
    be._models = {"m": None}
    cases = [(OverloadedError("m", 3, 3, 0.25), Overloaded, 0.25),
             (QueueDelayError("wait", "m", 0.5), Overloaded, 0.5),
             (NoCapacityError("full", "m", 2.0), Unavailable, 2.0)]
    for refusal, cls, retry in cases:
        err = be._refused(refusal)
        assert (type(err), str(err), err.retry_after_s) == (cls, str(refusal), retry)
    err = be._refused(UnknownModelError("x", ("m",)))
    assert type(err) is UnknownModel and err.model == "x"
