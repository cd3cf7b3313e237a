"""Canary ramps (splitserve.router.ramp, splitserve.router.route_book) in
simulated time: traffic is drawn from the table in force, each variant
answers from a seeded model of its health, and the book ticks every
simulated second."""

import random

import pytest

from splitserve.router.ramp import RampController, percentile
from splitserve.router.route_book import RouteBook
from splitserve.router.route_messages import (
    BookState,
    LatencyGuard,
    RampPolicy,
    RoutePolicy,
    VariantOutcome,
    decode,
    encode,
)
from splitserve.router.traffic import random_pick


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def ramp(**kw) -> RampPolicy:
    base = dict(variant="new", steps=(1.0, 10.0, 50.0, 100.0), hold_s=60.0, min_requests=50,
                max_error_rate=0.05)
    base.update(kw)
    return RampPolicy(**base)


def route(r: RampPolicy | None = None, weights=(1.0, 0.0)) -> RoutePolicy:
    return RoutePolicy("chat", ("old", "new"), weights, ramp=r)


class Sim:
    """``rps`` requests per simulated second over the book's table; variant
    -> (error probability, TTFT seconds, TPOT seconds)."""

    def __init__(self, book: RouteBook, clock: Clock, health: dict, rps: int = 40, seed: int = 7):
        self.book, self.clock, self.health, self.rps = book, clock, health, rps
        self.rng = random.Random(seed)
        self.moves = []

    def run(self, seconds: int) -> None:
        for _ in range(seconds):
            r = self.book.table().get("chat")
            outs = []
            for _ in range(self.rps):
                v = random_pick(self.rng, r.variants, r.weights)
                err, ttft, tpot = self.health[v]
                ok = self.rng.random() >= err
                jitter = self.rng.uniform(0.9, 1.1)
                outs.append(VariantOutcome("chat", v, ok, ttft * jitter, tpot * jitter))
            self.book.record(outs)
            self.clock.t += 1.0
            self.moves += self.book.tick()


HEALTHY = {"old": (0.01, 0.2, 0.02), "new": (0.01, 0.2, 0.02)}


def test_a_healthy_ramp_advances_step_by_step_after_each_hold():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp(max_error_rate_ratio=3.0, ttft=LatencyGuard("p90", 1.5)))])
    assert book.weights("chat") == (99.0, 1.0)
    sim = Sim(book, clock, HEALTHY, rps=200)
    sim.run(59)
    assert not sim.moves  # the hold time is not over
    sim.run(2)
    assert [(e.kind, e.to_percent) for _, e in sim.moves] == [("advance", 10.0)]
    assert book.weights("chat") == (90.0, 10.0)
    sim.run(200)
    kinds = [(e.kind, e.from_percent, e.to_percent) for _, e in sim.moves]
    assert kinds == [("advance", 1.0, 10.0), ("advance", 10.0, 50.0), ("complete", 50.0, 100.0)]
    times = [e.at for _, e in sim.moves]
    assert all(b - a >= 60 for a, b in zip(times, times[1:]))
    assert book.weights("chat") == (0.0, 100.0)
    status = book.status()[0]["ramp"]
    assert status["status"] == "complete" and status["last_move"]["kind"] == "complete"
    assert "held" in status["last_move"]["reason"]


def test_errors_roll_the_ramp_back_to_the_previous_step_and_stop_it():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp())])
    sim = Sim(book, clock, HEALTHY, rps=200)
    sim.run(61)  # 1% -> 10%
    assert book.weights("chat")[1] == 10.0
    sim.health = {**HEALTHY, "new": (0.3, 0.2, 0.02)}  # the canary starts failing
    sim.run(10)
    last = sim.moves[-1][1]
    assert (last.kind, last.from_percent, last.to_percent) == ("rollback", 10.0, 1.0)
    assert "error rate" in last.reason and "BREACH" in last.reason
    # rolled back before the hold time: a bad canary does not wait
    assert last.at - sim.moves[0][1].at < 60
    sim.health = HEALTHY
    sim.run(300)
    assert len(sim.moves) == 2 and book.weights("chat") == (99.0, 1.0)  # halted where it fell
    assert book.status()[0]["ramp"]["status"] == "rolled_back"


def test_rollback_to_zero():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp(rollback="zero"))])
    sim = Sim(book, clock, {**HEALTHY, "new": (0.5, 0.2, 0.02)}, rps=400)
    sim.run(30)
    assert sim.moves[-1][1].to_percent == 0.0 and book.weights("chat") == (100.0, 0.0)


def test_a_relative_latency_guard_breaks_on_a_slow_canary():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp(steps=(10.0, 50.0), max_error_rate=None,
                           tpot=LatencyGuard("p99", 1.3)))])
    sim = Sim(book, clock, {**HEALTHY, "new": (0.0, 0.2, 0.04)}, rps=100)
    sim.run(20)
    (_, ev), = sim.moves
    assert ev.kind == "rollback" and ev.to_percent == 0.0 and "tpot p99 ratio" in ev.reason


def test_the_error_ratio_guard_tolerates_a_floor():
    """A clean baseline: the canary's 0.5% errors stay under ratio x floor."""
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp(steps=(50.0, 100.0), hold_s=10, max_error_rate=None,
                           max_error_rate_ratio=2.0, error_rate_floor=0.01))])
    sim = Sim(book, clock, {"old": (0.0, 0.2, 0.02), "new": (0.005, 0.2, 0.02)}, rps=200)
    sim.run(15)
    assert [e.kind for _, e in sim.moves] == ["complete"]


def test_no_judgement_below_min_requests():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp(min_requests=500))])
    sim = Sim(book, clock, {**HEALTHY, "new": (1.0, 0.2, 0.02)}, rps=40)  # 0.4 canary req/s
    sim.run(300)
    assert not sim.moves  # every canary request failed, but too few to judge
    readings = book.status()[0]["ramp"]["guards"]
    assert readings[0]["ok"] is None and readings[0]["value"] == 1.0


def test_a_restarted_book_resumes_the_ramp_at_its_step():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp())])
    Sim(book, clock, HEALTHY, rps=200).run(61)
    saved = decode(encode(book.state()), BookState)  # as the controller persists it
    again = RouteBook(clock, saved)
    assert again.weights("chat") == (90.0, 10.0) and again.version == book.version
    assert again.status()[0]["ramp"]["last_move"]["kind"] == "advance"
    # the same routes applied again (a redeploy) keep it where it is
    assert again.apply([route(ramp())]) == [] and again.weights("chat") == (90.0, 10.0)
    # a changed route starts over
    assert again.apply([route(ramp(hold_s=30.0))]) == ["route chat: changed"]
    assert again.weights("chat") == (99.0, 1.0)


def test_static_weights_and_versions():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(None, weights=(3.0, 1.0))])
    v = book.version
    assert book.table().get("chat").weights == (3.0, 1.0)
    assert book.apply([route(None, weights=(3.0, 1.0))]) == [] and book.version == v
    book.apply([route(None, weights=(1.0, 1.0))])
    assert book.version > v and book.table().get("chat").weights == (1.0, 1.0)
    assert book.apply([]) == ["route chat: removed"] and book.table().routes == ()


def test_outcomes_of_unknown_routes_or_variants_are_ignored():
    clock = Clock()
    book = RouteBook(clock)
    book.apply([route(ramp())])
    book.record([VariantOutcome("other", "new", False), VariantOutcome("chat", "ghost", False)])
    c = book.ramps["chat"]
    assert c.new.requests == 0 and c.old.requests == 0


def test_a_one_step_ramp_is_complete_at_once():
    c = RampController(ramp(steps=(100.0,)), now=0.0)
    assert c.state.status == "complete" and c.percent == 100.0 and c.tick(1e9) is None


def test_percentile_is_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, "p50") == 50 and percentile(xs, "p90") == 90
    assert percentile(xs, "p99") == 99 and percentile([], "p50") is None


def test_wire_messages_refuse_unknown_fields():
    import msgspec

    data = msgspec.msgpack.encode({"version": 1, "policies": [], "ramps": {}, "bogus": 1})
    with pytest.raises(msgspec.ValidationError):
        decode(data, BookState)
