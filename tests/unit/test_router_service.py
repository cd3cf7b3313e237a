"""RouterService: the wait queue, admission leases and output-length
estimates, on an injected clock (no sleeps, no Ray)."""

import pytest

from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.estimator import MIN_SAMPLES, OutputLengths
from splitserve.router.exchange import QUEUED, Exchange, LeaseEnd, RouteCall
from splitserve.router.leases import Lease, LeaseTable
from splitserve.router.service import RouterService
from splitserve.router.types import (
    DecodeReplicaStats,
    NeverFitsError,
    NoCapacityError,
    NoReplicaError,
    OverloadedError,
    Placement,
    PrefillReplicaStats,
    QueueDelayError,
    QueueTimeoutError,
    RouteRequest,
    UnknownModelError,
)
from splitserve.router.wait_queue import WaitQueue, Waiting


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def service(clock, **kw) -> RouterService:
    kw.setdefault("policy", "least_loaded")
    return RouterService(RouterConfig(models={"m": ModelFacts(16, 1000)}, **kw), clock=clock)


def dec(clock, rid="d0", free=100, running=0, waiting=0, max_seqs=2, **kw) -> DecodeReplicaStats:
    return DecodeReplicaStats(
        replica_id=rid, model="m", free_blocks=free, total_blocks=100, running_seqs=running,
        max_seqs=max_seqs, block_size=16, waiting_requests=waiting, decode_step_s=0.01,
        prefill_tokens_per_s=10000.0, updated_at=clock(), **kw)


def pre(clock, rid="p0", pending=0) -> PrefillReplicaStats:
    return PrefillReplicaStats(replica_id=rid, model="m", pending_prompt_tokens=pending,
                               running_requests=0, prefill_tokens_per_s=10000.0,
                               updated_at=clock())


def call(clock, lease, prompt_len=32, max_tokens=16, model="m", **kw) -> RouteCall:
    kw.setdefault("arrival", clock())
    kw.setdefault("waiting_since", kw["arrival"])
    req = RouteRequest(lease, model, prompt_len, max_tokens, block_hashes=())
    return RouteCall(lease_id=lease, request=req, **kw)


def ask(svc, *calls, holder="h", **kw):
    return svc.exchange(Exchange(holder=holder, seen=svc.incarnation, calls=calls, **kw)).outcomes


def end(svc, *leases, holder="h", tokens=4, **kw):
    return svc.exchange(Exchange(holder=holder, seen=svc.incarnation, releases=tuple(
        LeaseEnd(lid, tokens) for lid in leases), **kw))


def placed_on(outcome) -> str:
    assert isinstance(outcome, Placement), outcome
    return outcome.decode_replica


def test_a_burst_past_capacity_waits_in_arrival_order_and_is_placed_as_slots_free():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock))  # 2 batch slots
    out = ask(svc, *(call(clock, f"r{i}") for i in range(5)))
    assert [placed_on(o) for o in out[:2]] == ["d0", "d0"]
    assert out[2:] == (QUEUED,) * 3
    assert svc.queued() == {"m": 3} and svc.in_flight("m") == 5
    clock.t += 0.1
    end(svc, "r0")  # a slot back: the oldest waiting request takes it
    assert [(lid, placed_on(p)) for lid, p in svc.take_resolved("h")] == [("r2", "d0")]
    assert svc.take_resolved("h") == []
    # the next push shows both running, one finished: one more slot
    svc.update_stats(dec(clock, running=1))
    assert [lid for lid, _ in svc.take_resolved("h")] == ["r3"]
    end(svc, "r1", "r2", "r3")
    assert [lid for lid, _ in svc.take_resolved("h")] == ["r4"]
    end(svc, "r4")
    assert (svc.in_flight("m"), svc.queued(), svc.counts["unbalanced_releases"]) == (0, {"m": 0}, 0)


def test_priority_goes_first_and_a_new_request_never_overtakes_a_waiting_one():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, running=2))  # full
    t0 = clock()
    assert ask(svc, call(clock, "old"), call(clock, "vip", priority=-5, arrival=t0 + 1)) == (QUEUED,) * 2
    svc.update_stats(dec(clock, running=1))
    assert [lid for lid, _ in svc.take_resolved("h")] == ["vip"]
    clock.t += 1
    svc.update_stats(dec(clock, running=2))  # vip runs
    assert ask(svc, call(clock, "new")) == (QUEUED,)
    end(svc, "vip")
    assert [lid for lid, _ in svc.take_resolved("h")] == ["old"]


def test_queue_deadline_refuses_with_429_and_frees_the_slot():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=2.0, retry_after_max_s=3.0)
    svc.update_stats(dec(clock, running=2))
    own = clock() + 1.0  # the request's own deadline comes first
    assert ask(svc, call(clock, "a"), call(clock, "b", deadline=own)) == (QUEUED, QUEUED)
    clock.t += 1.0
    svc.tick()
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "b" and type(err) is QueueTimeoutError and err.retry_after_s == 3.0
    assert "waited 1.000 s" in str(err)
    svc.update_stats(dec(clock, running=2))  # keep the replica live
    clock.t += 1.0
    svc.tick()
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "a" and isinstance(err, QueueTimeoutError)
    assert (svc.in_flight("m"), svc.refusals["queue_timeout"]) == (0, 2)
    end(svc, "a")  # the ingress' release after the refusal is not unbalanced
    assert svc.counts["unbalanced_releases"] == 0
    # a moved request keeps the time it already waited
    moved = call(clock, "late", waiting_since=clock() - 2.5)
    assert isinstance(ask(svc, moved)[0], QueueTimeoutError)


def test_predicted_prefill_wait_past_the_bound_is_refused_at_once():
    clock = Clock()
    svc = service(clock, policy="cost", max_queue_delay_s=0.5, local_prefill_max_tokens=0)
    svc.update_stats(pre(clock, pending=8000))  # 0.8 s of queue
    svc.update_stats(dec(clock))
    [err] = ask(svc, call(clock, "r"))
    assert type(err) is QueueDelayError and err.retry_after_s == pytest.approx(0.3)
    [p] = ask(svc, call(clock, "retry", admitted=True))  # an admitted request is placed
    assert p.prefill_replica == "p0"
    assert svc.in_flight("m") == 1


def test_admission_limit_counts_waiting_requests():
    clock = Clock()
    svc = service(clock, max_queue_per_model=3)
    svc.update_stats(dec(clock))
    out = ask(svc, *(call(clock, f"r{i}") for i in range(4)))
    assert [type(o).__name__ for o in out] == ["Placement", "Placement", "Queued",
                                              "OverloadedError"]
    assert (out[3].in_flight, out[3].limit) == (3, 3)
    [unknown] = ask(svc, call(clock, "x", model="nope"))
    assert isinstance(unknown, UnknownModelError)
    # a request admitted before (moved from another router) takes a slot past the limit
    assert ask(svc, call(clock, "moved", admitted=True)) == (QUEUED,)
    assert svc.in_flight("m") == 4


def test_no_live_replica_waits_for_the_grace_period_then_503():
    clock = Clock()
    svc = service(clock, no_replica_grace_s=10.0, max_queue_delay_s=60.0, lease_ttl_s=60.0)
    svc.update_stats(dec(clock))
    svc.suspect("d0")  # an RPC to it failed: the replica is gone
    assert ask(svc, call(clock, "a")) == (QUEUED,)
    clock.t += 5.0
    svc.tick()
    assert svc.take_resolved("h") == []  # still within the grace period
    svc.update_stats(dec(clock, rid="d1"))  # a new replica's first push
    [(lid, p)] = svc.take_resolved("h")
    assert (lid, placed_on(p)) == ("a", "d1")
    clock.t += 3.0
    svc.update_stats(dec(clock, rid="d1", running=1))
    clock.t += 3.0
    svc.remove_replica("d1")  # deregistered; d0 went stale long ago
    clock.t += 5.0
    assert ask(svc, call(clock, "b")) == (QUEUED,)  # the grace counts from d1's removal
    clock.t += 5.5
    svc.tick()
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "b" and type(err) is NoReplicaError and "no live decode replica" in str(err)
    [err] = ask(svc, call(clock, "c"))
    assert type(err) is NoReplicaError


def test_kv_room_is_the_expected_output_not_max_tokens():
    clock = Clock()
    svc = service(clock, expected_output_tokens=16)
    svc.update_stats(dec(clock, free=10, max_seqs=8))  # 160 tokens of room
    # 32 prompt + 16 expected = 3 blocks each, though max_tokens would need 34
    out = ask(svc, *(call(clock, f"r{i}", max_tokens=512) for i in range(4)))
    assert [type(o) for o in out] == [Placement, Placement, Placement, type(QUEUED)]
    # learned lengths replace the configured expectation
    for i in range(3):
        end(svc, f"r{i}", tokens=64)
    for i in range(MIN_SAMPLES):
        ask(svc, call(clock, f"s{i}"))
        end(svc, f"s{i}", tokens=64)
    assert svc.expected_output_tokens("m") == 64


def test_a_request_no_replica_could_ever_hold_is_refused_at_once():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, running=2))  # 100 blocks of 16: 1600 tokens
    [err] = ask(svc, call(clock, "big", prompt_len=100, max_tokens=1600))
    assert type(err) is NeverFitsError and "can never fit" in str(err)
    assert "the largest holds 1600 tokens" in str(err)
    assert ask(svc, call(clock, "fits", prompt_len=100, max_tokens=1500)) == (QUEUED,)
    assert svc.refusals == {"no_capacity": 1} and svc.in_flight("m") == 1


def test_output_length_estimate():
    est = OutputLengths(expected_tokens=100, quantile=0.9)
    assert est.expected("m", 4096) == 100 and est.expected("m", 10) == 10
    for n in range(1, MIN_SAMPLES):
        est.observe("m", n * 10)
    assert est.expected("m", 4096) == 100  # too few samples yet
    est.observe("m", 1000)
    assert est.expected("m", 4096) == 150  # p90 of 16 samples: the 15th smallest
    for _ in range(32):
        est.observe("m", 1000)  # the window moves on
    assert est.expected("m", 4096) == 1000
    assert est.expected("other", 4096) == 100
    off = OutputLengths(expected_tokens=0, quantile=0.9)
    off.observe("m", 5)
    assert off.expected("m", 4096) == 4096


def test_cancel_while_waiting_and_double_release_is_counted():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, running=2))
    assert ask(svc, call(clock, "a"), call(clock, "b")) == (QUEUED, QUEUED)
    end(svc, "a", tokens=-1)  # the client left while it waited
    assert svc.queued() == {"m": 1} and svc.in_flight("m") == 1
    end(svc, "a")
    assert svc.counts["unbalanced_releases"] == 1
    # a release meant for a previous incarnation is not this one's error
    svc.exchange(Exchange(holder="h", seen="old", releases=(LeaseEnd("zz"),)))
    assert svc.counts["unbalanced_releases"] == 1


def test_a_dead_holders_leases_expire_and_a_slow_one_gets_them_back():
    clock = Clock()
    svc = service(clock, lease_ttl_s=5.0)
    svc.update_stats(dec(clock, running=1))
    ask(svc, call(clock, "a"), call(clock, "b"), holder="ingress-1")  # placed, queued
    ask(svc, call(clock, "c"), holder="ingress-2")
    clock.t += 4.0
    svc.exchange(Exchange(holder="ingress-2"))  # a heartbeat
    clock.t += 1.5
    svc.update_stats(dec(clock, running=2))  # "a" runs
    svc.tick()  # ingress-1 silent for 5.5 s: both its slots end, its queued request too
    assert svc.counts["leases_expired"] == 2 and svc.in_flight("m") == 1
    # the slot "a" held goes to the queue at once
    assert [lid for lid, _ in svc.take_resolved("ingress-2")] == ["c"]
    # ingress-1 was only stalled: its next heartbeat lists "a" again
    svc.exchange(Exchange(holder="ingress-1", seen=svc.incarnation, live={"a": "m"},
                          releases=(LeaseEnd("b", -1),)))
    assert svc.in_flight("m") == 2 and svc.counts["unbalanced_releases"] == 0


def test_live_lists_rebuild_a_restarted_routers_slots_and_end_forgotten_ones():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, max_seqs=8))
    ask(svc, call(clock, "a"), call(clock, "b"))
    # a new incarnation (restart, or the standby taking over) learns them from the list
    fresh = service(clock)
    fresh.exchange(Exchange(holder="h", live={"a": "m", "b": "m", "x": "nope"}))
    assert fresh.in_flight("m") == 2 and fresh.counts["leases_adopted"] == 2
    # a list without "b": its slot ends; adopted, so no leak is counted
    fresh.exchange(Exchange(holder="h", live={"a": "m"}))
    assert fresh.in_flight("m") == 1 and fresh.counts["leases_reclaimed"] == 0
    # on the router that placed it, a lease its holder forgot is a reclaimed leak
    svc.exchange(Exchange(holder="h", seen=svc.incarnation, live={"a": "m"}))
    assert svc.in_flight("m") == 1 and svc.counts["leases_reclaimed"] == 1


def test_a_refused_lease_is_not_brought_back_by_an_older_live_list():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=1.0)
    svc.update_stats(dec(clock, running=2))
    ask(svc, call(clock, "a"))
    clock.t += 1.0
    svc.update_stats(dec(clock, running=2))
    svc.tick()
    assert svc.in_flight("m") == 0
    svc.exchange(Exchange(holder="h", seen=svc.incarnation, live={"a": "m"}))
    assert svc.in_flight("m") == 0


def test_a_retry_excluding_the_only_free_replica_does_not_block_the_queue():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, running=2))
    stuck = RouteRequest("s", "m", 32, 16, block_hashes=(), exclude_replicas=frozenset({"d0"}))
    t = clock()
    out = svc.exchange(Exchange(holder="h", calls=(
        RouteCall("s", stuck, arrival=t - 5, waiting_since=t, admitted=True),
        call(clock, "n")))).outcomes
    assert out == (QUEUED, QUEUED)
    svc.update_stats(dec(clock, running=1))
    assert [lid for lid, _ in svc.take_resolved("h")] == ["n"]


def test_suspect_replica_gets_no_placements_until_it_pushes_again():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, "d0"))
    svc.update_stats(dec(clock, "d1", running=1))
    svc.exchange(Exchange(holder="h", suspects=("d0",)))
    [p] = ask(svc, call(clock, "a"))
    assert placed_on(p) == "d1"
    clock.t += 0.25
    svc.update_stats(dec(clock, "d0"))
    [p] = ask(svc, call(clock, "b"))
    assert placed_on(p) == "d0"


def test_lease_table_and_wait_queue():
    leases = LeaseTable(ttl_s=2.0)
    leases.add(Lease("a", "h1", "m", adopted=False), now=0.0)
    leases.add(Lease("b", "h2", "m", adopted=False), now=1.0)
    assert leases.expired_holders(2.0) == ["h1"] and leases.expired_holders(2.0) == []
    assert [x.lease_id for x in leases.of_holder("h1")] == ["a"]
    assert leases.end("a", 2.0, may_return=True).lease_id == "a" and "a" not in leases
    assert leases.ended_recently("a") and leases.may_adopt("a")
    leases.end("b", 2.0)
    assert not leases.may_adopt("b") and leases.end("b", 2.0) is None
    leases.expired_holders(6.0)  # memories last 2 ttl
    assert not leases.ended_recently("a") and leases.may_adopt("b")

    q = WaitQueue()
    req = RouteRequest("r", "m", 1, 1, block_hashes=())
    for lid, prio, arrival in (("late", 0, 2.0), ("early", 0, 1.0), ("vip", -1, 3.0)):
        q.add(Waiting(lid, "h", req, prio, arrival, arrival, float("inf"), False))
    assert [e.lease_id for e in q] == ["vip", "early", "late"]
    assert q.remove("early").lease_id == "early" and q.remove("early") is None
    assert [e.lease_id for e in q] == ["vip", "late"] and q.oldest_wait_s(4.0) == 2.0
