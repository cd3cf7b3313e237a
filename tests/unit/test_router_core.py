"""RouterCore: stats bookkeeping, prefix events, admission, counters."""

import pytest

from splitserve.engine.hashing import block_hashes
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.core import RouterCore
from splitserve.router.types import (
    DecodeReplicaStats,
    InvalidRouteRequestError,
    InvalidStatsError,
    NoCapacityError,
    OverloadedError,
    PrefillReplicaStats,
    QueueDelayError,
    RouteRequest,
    RouterConfigError,
    UnbalancedReleaseError,
    UnknownModelError,
)

KV = 131072


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def core(policy="least_loaded", clock=None, **kw) -> RouterCore:
    facts = ModelFacts(block_size=16, kv_bytes_per_token=KV)
    kw.setdefault("network_bytes_per_s", 12.5e9)  # a 100 Gb/s link
    cfg = RouterConfig(policy=policy, models={"m": facts, "other": facts}, **kw)
    return RouterCore(cfg, clock=clock or Clock())


def pre(rid, pending=0, model="m", at=1000.0, **kw) -> PrefillReplicaStats:
    return PrefillReplicaStats(
        replica_id=rid,
        model=model,
        pending_prompt_tokens=pending,
        running_requests=0,
        prefill_tokens_per_s=10000.0,
        updated_at=at,
        **kw,
    )


def dec(rid, free=1000, running=0, model="m", at=1000.0, **kw) -> DecodeReplicaStats:
    return DecodeReplicaStats(
        replica_id=rid,
        model=model,
        free_blocks=free,
        total_blocks=1000,
        running_seqs=running,
        max_seqs=64,
        block_size=16,
        waiting_requests=0,
        decode_step_s=0.005,
        prefill_tokens_per_s=10000.0,
        updated_at=at,
        **kw,
    )


def tokens(tag: int, n: int) -> tuple[int, ...]:
    return tuple(tag * 10000 + i for i in range(n))


def request(prompt=tokens(1, 1024), max_tokens=64, model="m", rid="r", **kw) -> RouteRequest:
    return RouteRequest(rid, model, len(prompt), max_tokens, prompt_token_ids=prompt, **kw)


def test_optimistic_accounting_spreads_a_burst_until_the_next_push():
    router = core()
    for s in (pre("p0"), pre("p1"), dec("d0"), dec("d1")):
        router.update_stats(s)
    picks = [router.route(request(tokens(i, 1024))) for i in range(4)]
    assert [(p.prefill_replica, p.decode_replica) for p in picks] == [
        ("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1"),
    ]
    d0 = router.snapshot("m").decode[0]
    assert (d0.free_blocks, d0.waiting_requests) == (1000 - 2 * 68, 2)  # 1088 tokens = 68 blocks each
    assert router.snapshot("m").prefill[0].pending_prompt_tokens == 2048
    router.update_stats(pre("p0", pending=5, at=1001.0))  # the replica's own numbers win
    assert router.snapshot("m").prefill[0].pending_prompt_tokens == 5
    router.update_stats(pre("p0", pending=999, at=1000.5))  # older than held: ignored
    assert router.snapshot("m").prefill[0].pending_prompt_tokens == 5

    static = core(optimistic_updates=False)
    for s in (pre("p0"), pre("p1"), dec("d0"), dec("d1")):
        static.update_stats(s)
    picks = [static.route(request(tokens(i, 1024))) for i in range(3)]
    assert {(p.prefill_replica, p.decode_replica) for p in picks} == {("p0", "d0")}


def test_reported_blocks_steer_requests_and_token_ids_match_precomputed_hashes():
    router = core(policy="prefix_aware")
    for s in (pre("p0"), pre("p1"), dec("d0"), dec("d1")):
        router.update_stats(s)
    system = tokens(7, 512)
    router.on_blocks_stored("p1", block_hashes(system + tokens(8, 100), 16))
    by_tokens = router.route(request(system + tokens(9, 300)))
    assert (by_tokens.prefill_replica, by_tokens.reason) == ("p1", "prefix_hit")
    assert by_tokens.prefix_hit_tokens == 512
    hashes = tuple(block_hashes(system + tokens(9, 300), 16))
    by_hashes = router.route(RouteRequest("r2", "m", 812, 64, block_hashes=hashes))
    assert (by_hashes.prefill_replica, by_hashes.prefix_hit_tokens) == ("p1", 512)
    router.on_blocks_evicted("p1", hashes[:1])  # first block gone: the whole prefix is lost
    assert router.route(request(system + tokens(9, 300))).prefix_hit_tokens == 0


def test_optimistic_prefix_insert_keeps_a_new_prefix_together():
    router = core(policy="prefix_aware", optimistic_prefix_insert=True)
    for s in (pre("p0"), pre("p1"), dec("d0"), dec("d1")):
        router.update_stats(s)
    shared = tokens(3, 640)
    first = router.route(request(shared + tokens(4, 10)))
    second = router.route(request(shared + tokens(5, 10)))
    assert first.prefill_replica == second.prefill_replica == "p0"
    assert second.prefix_hit_tokens == 640
    assert router.index.num_blocks("d0") == 40


def test_stale_stats_and_removed_replicas_are_not_used():
    clock = Clock(1000.0)
    router = core(clock=clock)
    for s in (pre("p0"), dec("d0"), dec("d1", at=1003.0)):
        router.update_stats(s)
    router.on_blocks_stored("d0", block_hashes(tokens(1, 64), 16))
    clock.t = 1005.5  # d0 and p0 are 5.5 s old (ttl 5 s): d1 serves, prefill runs on it
    p = router.route(request())
    assert (p.prefill_replica, p.decode_replica, p.reason) == (None, "d1", "no_prefill_replica")
    assert router.remove_replica("d1") is True
    assert router.remove_replica("d1") is False
    with pytest.raises(NoCapacityError, match="1 stale"):
        router.route(request())
    assert router.counters().no_capacity == 1
    router.remove_replica("d0")
    assert router.index.num_blocks("d0") == 0


def test_refused_replicas_are_excluded_on_retry():
    router = core()
    for s in (pre("p0"), dec("d0"), dec("d1", running=10)):
        router.update_stats(s)
    assert router.route(request()).decode_replica == "d0"
    assert router.route(request(exclude_replicas=frozenset({"d0"}))).decode_replica == "d1"


def test_prefer_local_prefill_signal():
    router = core(policy="cost")
    for s in (pre("p0"), dec("d0")):
        router.update_stats(s)
    short = request(tokens(1, 256))
    assert router.route(short).prefill_replica == "p0"  # 0.0256+0.0047 s remote vs 0.0306 s local
    router.set_prefer_local_prefill(True)
    assert router.route(short).reason == "local_preferred"
    router.set_prefer_local_prefill(False)
    assert router.route(short).prefill_replica is not None


def test_counters_by_reason():
    router = core(policy="cost")
    for s in (pre("p0"), dec("d0")):
        router.update_stats(s)
    router.route(request(tokens(1, 2000)))  # local would be cheaper (equal speeds) but is too long
    router.set_prefer_local_prefill(True)
    router.route(request(tokens(2, 100)))
    router.route(request(tokens(3, 100)))
    c = router.counters()
    assert (c.decisions, c.local_prefill, c.no_capacity, c.overloaded) == (3, 2, 0, 0)
    assert c.by_reason == {"local_over_limit": 1, "local_preferred": 2}


def test_admission_refuses_with_retry_after_from_release_rate():
    clock = Clock(0.0)
    router = core(clock=clock, max_queue_per_model=3, retry_after_min_s=0.05, retry_after_max_s=5.0)
    for _ in range(3):
        router.admit("m")
    with pytest.raises(OverloadedError) as err:
        router.admit("m")
    # no release seen yet: the upper clamp
    assert (err.value.retry_after_s, err.value.in_flight, err.value.limit) == (5.0, 3, 3)
    router.admit("other")  # limits are per model
    for t in (1.0, 1.5, 2.0):  # releases 0.5 s apart
        clock.t = t
        router.release("m")
    for _ in range(3):
        router.admit("m")
    with pytest.raises(OverloadedError) as err:
        router.admit("m")
    assert err.value.retry_after_s == pytest.approx(0.5)
    clock.t = 2.01
    router.release("m")  # interval 0.01: mean 0.5 + 0.2 * (0.01 - 0.5) = 0.402
    router.admit("m")
    with pytest.raises(OverloadedError) as err:
        router.admit("m")
    assert err.value.retry_after_s == pytest.approx(0.402)
    c = router.counters()
    assert (c.overloaded, c.in_flight) == (3, {"m": 3, "other": 1})
    router.release("other")
    with pytest.raises(UnbalancedReleaseError, match="without a matching admit"):
        router.release("other")


def test_retry_after_is_clamped():
    clock = Clock(0.0)
    router = core(clock=clock, max_queue_per_model=1, retry_after_min_s=0.25)
    for t in (0.0, 0.001):
        clock.t = t
        router.admit("m")
        router.release("m")
    router.admit("m")
    with pytest.raises(OverloadedError) as err:
        router.admit("m")
    assert err.value.retry_after_s == 0.25


def test_unknown_models_and_invalid_input_are_refused():
    router = core()
    with pytest.raises(UnknownModelError, match="unknown model 'x'.*serves \\['m', 'other'\\]"):
        router.update_stats(pre("p0", model="x"))
    with pytest.raises(UnknownModelError):
        router.route(request(model="x"))
    with pytest.raises(UnknownModelError):
        router.admit("x")
    with pytest.raises(InvalidStatsError, match="'d0'.*free_blocks=2000"):
        router.update_stats(dec("d0", free=2000))
    with pytest.raises(InvalidStatsError, match="pending_prompt_tokens=-1"):
        router.update_stats(pre("p0", pending=-1))
    with pytest.raises(InvalidRouteRequestError, match="prompt_token_ids has 3 tokens but prompt_len is 4"):
        RouteRequest("r", "m", 4, 8, prompt_token_ids=(1, 2, 3))
    with pytest.raises(InvalidRouteRequestError, match="max_tokens"):
        RouteRequest("r", "m", 3, 0, prompt_token_ids=(1, 2, 3))
    with pytest.raises(RouterConfigError, match="unknown router policy"):
        core(policy="nope")
    with pytest.raises(RouterConfigError, match="stats_ttl_s must be > 0"):
        core(stats_ttl_s=0)
    with pytest.raises(RouterConfigError, match="prefix_index_touch_fraction"):
        core(prefix_index_touch_fraction=0)
    with pytest.raises(RouterConfigError, match="ModelFacts.block_size must be > 0, got 0"):
        ModelFacts(block_size=0, kv_bytes_per_token=KV)
    with pytest.raises(RouterConfigError, match=r"models\['m'\] must be a ModelFacts"):
        RouterConfig(models={"m": KV})
    with pytest.raises(UnknownModelError, match="unknown model 'x'"):
        RouterConfig(models={"m": ModelFacts(16, KV)}).model("x")


def test_replica_moving_to_another_model_or_pool_leaves_its_old_place():
    router = core()
    router.update_stats(pre("r0"))
    router.on_blocks_stored("r0", [1, 2])
    router.update_stats(pre("r0", model="other"))
    assert router.snapshot("m").prefill == ()
    assert [p.replica_id for p in router.snapshot("other").prefill] == ["r0"]
    assert router.index.num_blocks("r0") == 0
    router.update_stats(dec("r0", model="other"))
    assert router.snapshot("other").prefill == ()
    assert [d.replica_id for d in router.snapshot("other").decode] == ["r0"]


def test_unknown_replica_is_reported_and_a_snapshot_replaces_its_blocks():
    router = core()
    assert router.update_stats(pre("p0")) is True  # new: its cache is unknown
    assert router.update_stats(pre("p0", at=1001.0)) is False
    router.on_blocks_stored("p0", [1, 2, 3])
    router.on_blocks_stored("d9", [4])
    router.replace_blocks("p0", [2, 5])
    assert router.index.num_blocks("p0") == 2
    assert router.index.holders(1) == frozenset() and router.index.holders(5) == {"p0"}
    assert router.index.holders(4) == {"d9"}  # other replicas untouched
    router.remove_replica("p0")
    assert router.update_stats(pre("p0", at=1002.0)) is True  # forgotten: unknown again


def test_queue_delay_bound_sheds_new_requests_but_not_admitted_ones():
    router = core(policy="cost", max_queue_delay_s=0.5, retry_after_min_s=0.05)
    # 10k prompt tokens/s: queues of 0.8 s and 0.6 s
    for s in (pre("p0", pending=8000), pre("p1", pending=6000), dec("d0")):
        router.update_stats(s)
    with pytest.raises(QueueDelayError, match=r"wait 0\.600 s .* on p1 \(limit 0\.5 s") as err:
        router.route(request(rid="new"))
    assert err.value.retry_after_s == pytest.approx(0.1)
    assert isinstance(err.value, NoCapacityError) and err.value.model == "m"
    # a request already admitted (resumed after a fault) is placed anyway
    assert router.route(request(rid="resumed"), shed=False).prefill_replica == "p1"
    c = router.counters()
    assert (c.queue_delay, c.no_capacity, c.decisions) == (1, 0, 1)
    # the queue drains: placed again
    router.update_stats(pre("p1", pending=1000, at=1001.0))
    assert router.route(request(rid="later")).prefill_replica == "p1"


def test_queue_delay_bound_covers_local_prefill_and_can_be_off():
    busy = dec("d0", pending_prefill_tokens=20000)  # at 10k tokens/s
    router = core(policy="cost", max_queue_delay_s=1.0, retry_after_max_s=0.5)
    router.update_stats(busy)  # no prefill replica: the prompt prefills on d0, 2 s from now
    with pytest.raises(QueueDelayError, match="on d0") as err:
        router.route(request(tokens(1, 100)))
    assert err.value.retry_after_s == 0.5  # clamped
    off = core(policy="cost")
    off.update_stats(busy)
    assert off.route(request(tokens(1, 100))).decode_replica == "d0"
    with pytest.raises(RouterConfigError, match="max_queue_delay_s"):
        core(max_queue_delay_s=-1.0)


def test_each_model_is_placed_with_its_own_block_size():
    """Two models, blocks of 16 and 64 tokens: the prefix a replica caches
    counts in its own model's blocks (no smallest block size for all)."""
    cfg = RouterConfig(policy="prefix_aware", models={
        "small": ModelFacts(block_size=16, kv_bytes_per_token=KV),
        "big": ModelFacts(block_size=64, kv_bytes_per_token=KV)})
    router = RouterCore(cfg, clock=Clock())
    for model in ("small", "big"):
        for s in (pre(f"{model}-p0", model=model), pre(f"{model}-p1", model=model),
                  dec(f"{model}-d0", model=model)):
            router.update_stats(s)
    prompt = tokens(3, 256)
    for model, size in (("small", 16), ("big", 64)):
        router.on_blocks_stored(f"{model}-p1", block_hashes(prompt, size)[:2])  # two blocks
        placed = router.route(request(prompt, model=model, rid=model))  # hashed by the router
        assert (placed.prefill_replica, placed.prefix_hit_tokens) == (f"{model}-p1", 2 * size)
