"""A request's choices (n > 1) are admitted all or none (``Exchange.groups``),
and the router's refusals name the operator's YAML keys. RouterService on an
injected clock: no sleeps, no Ray."""

from splitserve.router.exchange import QUEUED, Exchange, LeaseEnd
from splitserve.router.exchange_codec import decode_reply, encode_reply
from splitserve.router.exchange import ExchangeReply
from splitserve.router.types import (DecodeReplicaStats, OverloadedError, Placement,
                                     PrefillReplicaStats, QueueDelayError,
                                     NoReplicaError)
from tests.unit.test_router_service import Clock, call, service
from tests.unit.test_router_service import dec as service_dec


def dec(clock, rid="d0", max_seqs=8, **kw) -> DecodeReplicaStats:
    return service_dec(clock, rid, max_seqs=max_seqs, **kw)


def ask(svc, *calls, groups=(), holder="h"):
    return svc.exchange(Exchange(holder=holder, seen=svc.incarnation, calls=calls,
                                 groups=groups)).outcomes


def end(svc, *leases, holder="h"):
    svc.exchange(Exchange(holder=holder, seen=svc.incarnation,
                          releases=tuple(LeaseEnd(lid, 4) for lid in leases)))


def test_a_group_that_does_not_fit_whole_is_refused_whole_and_takes_no_slot():
    clock = Clock()
    svc = service(clock, max_queue_per_model=3)
    svc.update_stats(dec(clock))
    assert all(isinstance(o, Placement) for o in ask(svc, call(clock, "a"), call(clock, "b")))
    out = ask(svc, call(clock, "g0"), call(clock, "g1"), groups=((0, 1),))
    assert all(isinstance(o, OverloadedError) for o in out), out
    assert out[0].needed == 2 and out[0].retry_after_s > 0
    assert "2 choices" in str(out[0])
    assert svc.in_flight("m") == 2  # no slot was taken, not even for a moment
    assert svc.refusals["overloaded"] == 2
    # the slot left is free for a single request
    assert isinstance(ask(svc, call(clock, "c"))[0], Placement)


def test_a_group_that_fits_is_admitted_whole_placed_or_queued():
    clock = Clock()
    svc = service(clock, max_queue_per_model=4)
    svc.update_stats(dec(clock, max_seqs=2))  # two can run; the rest wait
    out = ask(svc, *(call(clock, f"g{i}") for i in range(3)), groups=((0, 1, 2),))
    assert [type(o) for o in out[:2]] == [Placement, Placement] and out[2] is QUEUED
    assert svc.in_flight("m") == 3
    # a group of two does not fit the one slot left: refused before any placement
    out = ask(svc, call(clock, "h0"), call(clock, "h1"), groups=((0, 1),))
    assert all(isinstance(o, OverloadedError) for o in out)
    assert svc.in_flight("m") == 3
    end(svc, "g0")
    assert [lid for lid, _ in svc.take_resolved("h")] == ["g2"]


def test_a_group_whose_first_choice_is_shed_is_refused_whole():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=0.5)
    svc.update_stats(dec(clock))
    svc.update_stats(PrefillReplicaStats(replica_id="p0", model="m", pending_prompt_tokens=50000,
                                         running_requests=1, prefill_tokens_per_s=10000.0,
                                         updated_at=clock()))
    out = ask(svc, call(clock, "g0", prompt_len=200), call(clock, "g1", prompt_len=200),
              groups=((0, 1),))
    assert all(isinstance(o, QueueDelayError) for o in out), out
    assert "router.max_queue_delay_s" in str(out[0])
    assert svc.in_flight("m") == 0
    assert svc.leases.get("g0") is None and svc.leases.get("g1") is None


def test_groups_and_single_calls_in_one_exchange_keep_their_order_and_the_limit():
    clock = Clock()
    svc = service(clock, max_queue_per_model=3)
    svc.update_stats(dec(clock))
    out = ask(svc, call(clock, "s0"), call(clock, "g0"), call(clock, "g1"), call(clock, "s1"),
              call(clock, "g2"), groups=((1, 2, 4),))
    assert isinstance(out[0], Placement)
    assert [type(out[i]) for i in (1, 2, 4)] == [OverloadedError] * 3
    assert isinstance(out[3], Placement)
    assert svc.in_flight("m") == 2


def test_an_admitted_member_is_not_counted_again():
    clock = Clock()
    svc = service(clock, max_queue_per_model=2)
    svc.update_stats(dec(clock))
    assert isinstance(ask(svc, call(clock, "g0"))[0], Placement)
    # g0 retried (admitted) with its sibling g1: one new slot is needed and free
    out = ask(svc, call(clock, "g0", admitted=True), call(clock, "g1"), groups=((0, 1),))
    assert all(isinstance(o, Placement) for o in out), out
    assert svc.in_flight("m") == 2


def test_the_group_refusal_crosses_the_wire():
    err = OverloadedError("m", 3, 4, 1.5, needed=2)
    back = decode_reply(encode_reply(ExchangeReply("i", (err,)))).outcomes[0]
    assert isinstance(back, OverloadedError) and back.needed == 2 and str(back) == str(err)


def test_refusals_name_the_operator_yaml_keys():
    clock = Clock()
    svc = service(clock, max_queue_per_model=1, max_queue_delay_s=1.0, no_replica_grace_s=2.0)
    svc.update_stats(dec(clock, max_seqs=1))
    assert isinstance(ask(svc, call(clock, "a"))[0], Placement)
    over = ask(svc, call(clock, "b"))[0]
    assert isinstance(over, OverloadedError)
    assert "router.max_queue_per_model" in str(over) and "RouterConfig" not in str(over)
    svc2 = service(clock, max_queue_delay_s=1.0, max_resume_wait_s=3.0)
    svc2.update_stats(dec(clock, max_seqs=1))
    assert isinstance(ask(svc2, call(clock, "a"))[0], Placement)
    assert ask(svc2, call(clock, "b"), call(clock, "r", resumed=True)) == (QUEUED, QUEUED)
    clock.t += 1.5
    svc2.tick()
    clock.t += 2.0
    svc2.tick()
    texts = {lid: str(o) for lid, o in svc2.take_resolved("h")}
    assert "router.max_queue_delay_s" in texts["b"] and "RouterConfig" not in texts["b"]
    assert "router.max_resume_wait_s" in texts["r"] and "RouterConfig" not in texts["r"]
    svc3 = service(clock, no_replica_grace_s=2.0)
    assert ask(svc3, call(clock, "x")) == (QUEUED,)
    clock.t += 3.0
    svc3.tick()
    (lid, err), = svc3.take_resolved("h")
    assert isinstance(err, NoReplicaError)
    assert "router.no_replica_grace_s" in str(err) and "RouterConfig" not in str(err)
