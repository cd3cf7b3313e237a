"""Stats a replica took before a placement do not reopen the seat that
placement filled: RouterCore counts again, on every push, the placements
it made after the push's ``updated_at``. On an injected clock, no Ray."""

from splitserve.router.exchange import QUEUED
from splitserve.router.service import RouterService
from tests.unit.test_router_service import Clock, ask, call, dec, end, placed_on, pre, service


def _one_seat(clock) -> RouterService:
    svc = service(clock)
    svc.update_stats(dec(clock, max_seqs=1))
    return svc


def test_a_push_taken_before_a_placement_does_not_reopen_its_seat():
    clock = Clock()
    svc = _one_seat(clock)
    clock.t += 0.2
    taken = Clock(clock())  # the replica reads its stats now: idle
    clock.t += 0.05
    assert placed_on(ask(svc, call(clock, "a"))[0]) == "d0"  # the one seat
    clock.t += 0.05
    # that push (taken before "a" was placed) arrives now: still no seat
    svc.update_stats(dec(taken, max_seqs=1))
    assert ask(svc, call(clock, "b")) == (QUEUED,)
    # a push taken after the placement (the replica runs "a") replaces the estimate
    svc.update_stats(dec(clock, max_seqs=1, running=1))
    assert svc.queued() == {"m": 1}
    end(svc, "a")
    assert [lid for lid, _ in svc.take_resolved("h")] == ["b"]
    end(svc, "b")
    assert svc.in_flight("m") == 0


def test_a_placement_released_before_the_stale_push_is_not_counted_again():
    clock = Clock()
    svc = _one_seat(clock)
    clock.t += 0.2
    taken = Clock(clock())
    clock.t += 0.05
    placed_on(ask(svc, call(clock, "a"))[0])
    end(svc, "a")  # it ended before the push arrives
    svc.update_stats(dec(taken, max_seqs=1))
    assert placed_on(ask(svc, call(clock, "b"))[0]) == "d0"


def test_a_prefill_queue_keeps_the_placements_made_after_its_push():
    clock = Clock()
    svc = service(clock, policy="cost", local_prefill_max_tokens=0)
    svc.update_stats(dec(clock, max_seqs=8))
    svc.update_stats(pre(clock, "p0"))
    clock.t += 0.2
    taken = Clock(clock())
    clock.t += 0.05
    out = ask(svc, call(clock, "a", prompt_len=640))[0]
    assert out.prefill_replica == "p0"

    def pending() -> int:
        return svc.core.snapshot("m").prefill_by_id["p0"].pending_prompt_tokens

    assert pending() == 640
    svc.update_stats(pre(taken, "p0"))  # taken before "a" was placed: "a" still counts
    assert pending() == 640
    clock.t += 0.05
    svc.update_stats(pre(clock, "p0", pending=640))  # the replica's own count of it
    assert pending() == 640
    clock.t += 0.25
    svc.update_stats(pre(clock, "p0"))  # done
    assert pending() == 0
