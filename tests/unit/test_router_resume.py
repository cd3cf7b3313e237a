"""Resumed streams at the router (``RouteCall.resumed``): ahead of new
requests, bounded by ``max_resume_wait_s``, not ``max_queue_delay_s``.
On an injected clock, no Ray."""

from splitserve.router.exchange import QUEUED, RouteCall
from splitserve.router.types import QueueTimeoutError, RouteRequest
from tests.unit.test_router_service import Clock, ask, call, dec, end, placed_on, service


def test_a_resumed_stream_outwaits_the_new_request_bound_and_goes_first():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=2.0, max_resume_wait_s=60.0)
    svc.update_stats(dec(clock, running=2))  # no seat
    assert ask(svc, call(clock, "new", priority=-5), call(clock, "resumed", resumed=True,
                                                        admitted=True)) == (QUEUED, QUEUED)
    for _ in range(5):  # the pool stays short of seats for 5 s
        clock.t += 1.0
        svc.update_stats(dec(clock, running=2))
        ask(svc)  # the ingress' heartbeat
        svc.tick()
    # the new request hit max_queue_delay_s; the resumed stream still waits
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "new" and isinstance(err, QueueTimeoutError)
    assert svc.queued() == {"m": 1}
    assert ask(svc, call(clock, "later", priority=-5)) == (QUEUED,)
    svc.update_stats(dec(clock, running=1))  # a seat: the resumed stream, not the priority
    assert [lid for lid, _ in svc.take_resolved("h")] == ["resumed"]
    end(svc, "resumed", "new", "later")
    assert (svc.in_flight("m"), svc.counts["unbalanced_releases"]) == (0, 0)


def test_a_resumed_stream_has_its_own_bound_and_its_own_deadline():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=1.0, max_resume_wait_s=10.0, no_replica_grace_s=100)
    svc.update_stats(dec(clock, running=2))
    own = clock() + 4.0
    assert ask(svc, call(clock, "a", resumed=True), call(clock, "b", resumed=True, deadline=own)) \
        == (QUEUED, QUEUED)
    for _ in range(4):
        clock.t += 1.0
        ask(svc)  # the ingress' heartbeat
        svc.tick()
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "b" and isinstance(err, QueueTimeoutError)
    for _ in range(6):
        clock.t += 1.0
        ask(svc)
        svc.tick()
    [(lid, err)] = svc.take_resolved("h")
    assert lid == "a" and "max_resume_wait_s 10 s for a resumed stream" in str(err)
    assert svc.in_flight("m") == 0


def test_no_resume_bound_waits_until_the_client_gives_up():
    clock = Clock()
    svc = service(clock, max_queue_delay_s=1.0, max_resume_wait_s=0, lease_ttl_s=30.0)
    svc.update_stats(dec(clock, running=2))
    assert ask(svc, call(clock, "a", resumed=True)) == (QUEUED,)
    for _ in range(360):  # an hour
        clock.t += 10.0
        svc.update_stats(dec(clock, running=2))
        ask(svc)
        svc.tick()
    assert svc.take_resolved("h") == [] and svc.queued() == {"m": 1}
    end(svc, "a")  # the client left: its slot is free
    assert (svc.in_flight("m"), svc.queued()) == (0, {"m": 0})


def _refused(clock, lease, *replicas, refused=True):
    """A resumed stream that ``replicas`` turned away (for want of KV room
    when ``refused``, else for a failure)."""
    excl = frozenset(replicas)
    req = RouteRequest(lease, "m", 32, 16, block_hashes=(), exclude_replicas=excl,
                       refused_by=excl if refused else frozenset())
    return RouteCall(lease, req, arrival=clock(), waiting_since=clock(), resumed=True)


def test_a_replica_that_refused_for_room_gets_the_stream_back_once_it_reports_again():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, "d0"))  # the router sees room: its view is stale
    assert ask(svc, _refused(clock, "a", "d0")) == (QUEUED,)
    svc.tick()
    assert svc.take_resolved("h") == []  # no fresh word from d0 yet
    clock.t += 0.25
    svc.update_stats(dec(clock, "d0", running=1))  # its push: one seat left
    [(lid, p)] = svc.take_resolved("h")
    assert (lid, placed_on(p)) == ("a", "d0")


def test_a_replica_that_refused_for_room_stays_out_while_another_can_take_the_stream():
    clock = Clock()
    svc = service(clock)
    svc.update_stats(dec(clock, "d0"))
    svc.update_stats(dec(clock, "d1", running=2))  # full
    assert ask(svc, _refused(clock, "a", "d0")) == (QUEUED,)
    clock.t += 0.25
    svc.update_stats(dec(clock, "d1", running=1))  # d1 has a seat: it goes there
    [(lid, p)] = svc.take_resolved("h")
    assert (lid, placed_on(p)) == ("a", "d1")


def test_a_replica_that_failed_the_stream_is_never_given_it_again():
    clock = Clock()
    svc = service(clock, no_replica_grace_s=100)
    svc.update_stats(dec(clock, "d0"))
    assert ask(svc, _refused(clock, "a", "d0", refused=False)) == (QUEUED,)
    for _ in range(8):
        clock.t += 0.25
        svc.update_stats(dec(clock, "d0"))
        svc.tick()
    assert svc.take_resolved("h") == [] and svc.queued() == {"m": 1}
