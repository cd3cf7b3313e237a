"""Placement policies on constructed snapshots: exact choices and TTFTs."""

import random

import pytest

from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.cost_model import prefill_queue_s, remote_ttft_s, usable_hit_tokens
from splitserve.router.eligibility import decode_usable, prefill_usable
from splitserve.router.policies import POLICIES, get_policy
from splitserve.router.types import (
    ClusterSnapshot,
    DecodeReplicaStats,
    NoCapacityError,
    PolicyState,
    PrefillReplicaStats,
    RouteRequest,
    RouterConfigError,
    UnknownModelError,
)

NOW = 1000.0
KV = 131072  # bytes per token, a Llama-3-8B-sized KV cache
FACTS = ModelFacts(block_size=16, kv_bytes_per_token=KV)


def config(**kw) -> RouterConfig:
    kw.setdefault("network_bytes_per_s", 12.5e9)  # a 100 Gb/s link unless a case says otherwise
    return RouterConfig(models={"m": FACTS, "other": FACTS}, **kw)


def pre(rid, pending=0, speed=10000.0, model="m", **kw) -> PrefillReplicaStats:
    kw.setdefault("updated_at", NOW)
    return PrefillReplicaStats(
        replica_id=rid,
        model=model,
        pending_prompt_tokens=pending,
        running_requests=0,
        prefill_tokens_per_s=speed,
        **kw,
    )


def dec(rid, running=0, free=1000, total=1000, max_seqs=64, speed=10000.0, step=0.005, model="m", **kw):
    kw.setdefault("updated_at", NOW)
    return DecodeReplicaStats(
        replica_id=rid,
        model=model,
        free_blocks=free,
        total_blocks=total,
        running_seqs=running,
        max_seqs=max_seqs,
        block_size=16,
        waiting_requests=kw.pop("waiting", 0),
        decode_step_s=step,
        prefill_tokens_per_s=speed,
        **kw,
    )


def req(prompt_len=256, max_tokens=64, model="m", **kw) -> RouteRequest:
    return RouteRequest("r1", model, prompt_len, max_tokens, block_hashes=(), **kw)


def snap(*replicas) -> ClusterSnapshot:
    return ClusterSnapshot(
        prefill=tuple(r for r in replicas if isinstance(r, PrefillReplicaStats)),
        decode=tuple(r for r in replicas if isinstance(r, DecodeReplicaStats)),
        now=NOW,
    )


def place(policy, request, snapshot, matches=None, cfg=None, state=None):
    return get_policy(policy)(request, snapshot, matches or {}, cfg or config(), state or PolicyState())


def xfer(prompt_len, bandwidth=12.5e9, overhead=0.002):
    return prompt_len * KV / bandwidth + overhead


def test_round_robin_cycles_exactly_in_id_order_and_skips_unusable():
    state = PolicyState()
    s = snap(pre("p1"), pre("p0"), pre("p2"), dec("d1"), dec("d0"))
    picks = [place("round_robin", req(), s, state=state) for _ in range(7)]
    assert [p.prefill_replica for p in picks] == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert [p.decode_replica for p in picks] == ["d0", "d1", "d0", "d1", "d0", "d1", "d0"]
    assert {p.reason for p in picks} == {"round_robin"}
    s = snap(pre("p1", draining=True), pre("p0"), pre("p2"), dec("d1"), dec("d0"))
    picks = [place("round_robin", req(), s, state=state).prefill_replica for _ in range(4)]
    assert picks == ["p2", "p0", "p2", "p0"]  # p1 skipped, the cycle goes on from p1's turn


def test_least_loaded_picks_shortest_queue_and_lowest_load():
    s = snap(
        pre("pa", pending=3000, speed=30000.0),  # 0.10 s queue
        pre("pb", pending=1500, speed=10000.0),  # 0.15 s
        pre("pc", pending=200, speed=0.0),  # unmeasured: assumed 5000 tok/s -> 0.04 s
        dec("da", running=10, free=900),  # load max(11/64, 101/1000) = 0.171875
        dec("db", running=4, free=500),  # max(5/64, 501/1000) = 0.501
        dec("dc", running=8, free=950),  # max(9/64, 51/1000) = 0.140625
    )
    p = place("least_loaded", req(), s, matches={"da": 15})  # ignores cached blocks
    assert (p.prefill_replica, p.decode_replica, p.reason) == ("pc", "dc", "least_loaded")
    assert p.predicted_ttft_s == pytest.approx((200 + 256) / 5000 + xfer(256))


@pytest.mark.parametrize("policy", ["cost", "prefix_aware"])
def test_prefix_hit_beats_slight_prefill_imbalance(policy):
    s = snap(pre("pa", pending=500), pre("pb", pending=0), dec("d0"))
    p = place(policy, req(prompt_len=1024), s, matches={"pa": 60})
    assert p.prefill_replica == "pa"
    assert p.prefix_hit_tokens == 960
    assert p.predicted_ttft_s == pytest.approx((500 + 64) / 10000 + xfer(1024))
    assert p.reason == ("remote_cheaper" if policy == "cost" else "prefix_hit")


@pytest.mark.parametrize("policy, pending", [("cost", 20000), ("prefix_aware", 5000)])
def test_overloaded_prefix_holder_falls_back_to_idle_replica(policy, pending):
    # cost: 2.0064 s on pa vs 0.1024 s on pb; prefix_aware: pa's 0.5 s queue
    # is beyond the 0.25 s band above pb's empty one.
    s = snap(pre("pa", pending=pending), pre("pb", pending=0), dec("d0"))
    p = place(policy, req(prompt_len=1024), s, matches={"pa": 60})
    assert (p.prefill_replica, p.prefix_hit_tokens) == ("pb", 0)
    assert p.predicted_ttft_s == pytest.approx(1024 / 10000 + xfer(1024))


def test_whole_prompt_cached_still_computes_its_last_token():
    s = snap(pre("pa"), dec("d0"))
    p = place("cost", req(prompt_len=64), s, matches={"pa": 4})  # 4 full blocks = the whole prompt
    assert p.prefix_hit_tokens == 48  # (64 - 1) // 16 blocks count


@pytest.mark.parametrize("policy", ["cost", "prefix_aware"])
def test_decode_prefix_hit_beats_slight_load_imbalance_until_full(policy):
    s = snap(pre("p0"), dec("da", running=19), dec("db", running=12))
    # da: 20/64 - 0.5 * 512/1024 = 0.0625 beats db: 13/64 = 0.203125
    assert place(policy, req(prompt_len=1024), s, matches={"da": 32}).decode_replica == "da"
    assert place("least_loaded", req(prompt_len=1024), s, matches={"da": 32}).decode_replica == "db"
    for full in (dec("da", running=64), dec("da", running=60, waiting=4), dec("da", free=60)):
        s = snap(pre("p0"), full, dec("db", running=12))  # 1088 tokens need 68 blocks
        assert place(policy, req(prompt_len=1024), s, matches={"da": 32}).decode_replica == "db"


def test_local_prefill_when_transfer_is_slower():
    cfg = config(network_bytes_per_s=1.25e9)  # 10 Gb/s
    s = snap(pre("p0", speed=20000.0), dec("d0", speed=10000.0, step=0.005))
    # remote 256/20000 + 0.0268 + 0.002 = 0.0416 s; local 256/10000 + 0.005 = 0.0306 s
    p = place("cost", req(prompt_len=256), s, cfg=cfg)
    assert (p.prefill_replica, p.decode_replica, p.reason) == (None, "d0", "local_cheaper")
    assert p.predicted_ttft_s == pytest.approx(0.0306)


def test_remote_prefill_when_prompt_is_long_and_link_fast():
    cfg = config(local_prefill_max_tokens=8192)  # let the cost model decide alone
    s = snap(pre("p0", speed=20000.0), dec("d0", speed=10000.0, step=0.005))
    # remote 0.2 + 0.0419 + 0.002 = 0.2439 s; local 0.4 + 0.005 = 0.405 s
    p = place("cost", req(prompt_len=4000), s, cfg=cfg)
    assert (p.prefill_replica, p.reason) == ("p0", "remote_cheaper")
    assert p.predicted_ttft_s == pytest.approx(4000 / 20000 + xfer(4000))


def test_local_prefill_limit_and_decode_prefix_cache():
    cfg = config(network_bytes_per_s=1.25e9, local_prefill_max_tokens=512)
    s = snap(pre("p0", speed=20000.0), dec("d0", speed=10000.0, step=0.005))
    # local (0.1074 s) beats remote (0.1606 s) but 1024 uncached tokens > 512
    p = place("cost", req(prompt_len=1024), s, cfg=cfg)
    assert (p.prefill_replica, p.reason) == ("p0", "local_over_limit")
    # with 640 tokens cached on d0 only 384 remain: local is allowed and cheaper
    p = place("cost", req(prompt_len=1024), s, matches={"d0": 40}, cfg=cfg)
    assert (p.prefill_replica, p.reason, p.prefix_hit_tokens) == (None, "local_cheaper", 640)
    assert p.predicted_ttft_s == pytest.approx(384 / 10000 + 0.005)


def test_prefer_local_prefill_from_state_or_config():
    s = snap(pre("p0", speed=20000.0), dec("d0", speed=10000.0, step=0.005))
    assert place("cost", req(prompt_len=400), s).reason == "remote_cheaper"
    p = place("cost", req(prompt_len=400), s, state=PolicyState(prefer_local_prefill=True))
    assert (p.prefill_replica, p.reason) == (None, "local_preferred")
    p = place("cost", req(prompt_len=400), s, cfg=config(prefer_local_prefill=True))
    assert (p.prefill_replica, p.reason) == (None, "local_preferred")
    # never past the local limit: a long local prefill would stall decoding
    p = place("cost", req(prompt_len=600), s, cfg=config(prefer_local_prefill=True))
    assert (p.prefill_replica, p.reason) == ("p0", "remote_cheaper")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_no_usable_prefill_replica_prefills_on_decode(policy):
    s = snap(pre("p0", draining=True), pre("p1", healthy=False), dec("d0", step=0.005))
    p = place(policy, req(prompt_len=4000), s)
    assert (p.prefill_replica, p.decode_replica, p.reason) == (None, "d0", "no_prefill_replica")
    assert p.predicted_ttft_s == pytest.approx(4000 / 10000 + 0.005)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_requests_only_go_to_their_models_replicas(policy):
    s = snap(
        pre("idle-other", model="other"),
        dec("idle-other-d", model="other"),
        pre("busy-m", pending=9000),
        dec("busy-m-d", running=50, free=100),
    )
    p = place(policy, req(prompt_len=1024), s)  # too long to prefill on decode
    assert (p.prefill_replica, p.decode_replica) == ("busy-m", "busy-m-d")
    p = place(policy, req(prompt_len=1024, model="other"), s)
    assert (p.prefill_replica, p.decode_replica) == ("idle-other", "idle-other-d")


@pytest.mark.parametrize("policy", ["cost", "least_loaded", "prefix_aware"])
def test_stale_unhealthy_draining_and_excluded_replicas_are_skipped(policy):
    s = snap(
        pre("p-stale", pending=0, updated_at=NOW - 5.01),
        pre("p-sick", pending=100, healthy=False),
        pre("p-drain", pending=200, draining=True),
        pre("p-refused", pending=300),
        pre("p-ok", pending=400),
        dec("d-stale", running=0, updated_at=NOW - 5.01),
        dec("d-sick", running=1, healthy=False),
        dec("d-drain", running=2, draining=True),
        dec("d-refused", running=3),
        dec("d-ok", running=4),
    )
    p = place(policy, req(prompt_len=1024, exclude_replicas=frozenset({"p-refused", "d-refused"})), s)
    assert (p.prefill_replica, p.decode_replica) == ("p-ok", "d-ok")
    fresh = snap(pre("p", updated_at=NOW - 5.0), dec("d", updated_at=NOW - 5.0))  # exactly ttl: fresh
    assert place(policy, req(prompt_len=1024), fresh).prefill_replica == "p"


def test_same_node_link_can_win_over_a_shorter_queue():
    s = snap(
        pre("far", pending=0, node_id="n1"), pre("near", pending=50, node_id="n2"), dec("d0", node_id="n2")
    )
    p = place("cost", req(prompt_len=1024), s)
    assert p.prefill_replica == "near"
    assert p.predicted_ttft_s == pytest.approx(1074 / 10000 + xfer(1024, bandwidth=50e9))


def test_no_capacity_error_says_why_per_replica():
    s = snap(
        pre("p0"),
        dec("d-full", running=64),
        dec("d-small", free=10),
        dec("d-old", updated_at=NOW - 60),
        dec("d-other", model="other"),
    )
    with pytest.raises(NoCapacityError) as err:
        place("cost", req(prompt_len=1024), s)
    assert err.value.model == "m"
    assert "1 batch full, 1 short of free KV blocks, 1 stale" in str(err.value)
    with pytest.raises(NoCapacityError, match="no decode replica of model 'm' has reported stats"):
        place("round_robin", req(), snap(pre("p0")))


def test_unknown_model_and_policy_names():
    with pytest.raises(UnknownModelError, match="unknown model 'x'"):
        place("cost", req(model="x"), snap(pre("p0", model="x"), dec("d0", model="x")))
    with pytest.raises(RouterConfigError, match="unknown router policy 'fastest'"):
        get_policy("fastest")


# -- the pruned searches against a brute-force reference ------------------


def _reference(policy, r, s, matches, cfg, state):
    """(prefill id | None, decode id, reason) by scoring every replica."""
    horizon, total = s.now - cfg.stats_ttl_s, r.prompt_len + r.max_tokens
    decodes = [d for d in s.decode if decode_usable(d, r.model, horizon, r.exclude_replicas, total)]
    prefills = [p for p in s.prefill if prefill_usable(p, r.model, horizon, r.exclude_replicas)]
    block_size = cfg.model(r.model).block_size
    hit = lambda rid: usable_hit_tokens(matches.get(rid, 0), r.prompt_len, block_size)  # noqa: E731
    weight = 0.0 if policy == "least_loaded" else cfg.prefix_weight

    def load(d):
        slots = (d.running_seqs + d.waiting_requests + 1) / d.max_seqs
        return max(slots, (d.total_blocks - d.free_blocks + 1) / d.total_blocks)

    d = min(decodes, key=lambda d: (load(d) - weight * hit(d.replica_id) / r.prompt_len, d.replica_id))
    if not prefills:
        return None, d.replica_id, "no_prefill_replica"
    if policy == "least_loaded":
        p = min(prefills, key=lambda p: (prefill_queue_s(p, cfg), p.replica_id))
        return p.replica_id, d.replica_id, "least_loaded"
    if policy == "prefix_aware":
        band = min(prefill_queue_s(p, cfg) for p in prefills) + cfg.prefix_max_extra_queue_s
        inside = [p for p in prefills if prefill_queue_s(p, cfg) <= band]
        p = min(inside, key=lambda p: (-hit(p.replica_id), prefill_queue_s(p, cfg), p.replica_id))
        return p.replica_id, d.replica_id, "prefix_hit" if matches.get(p.replica_id) else "least_loaded"
    def ttft(p):
        return remote_ttft_s(p, d, r.prompt_len, r.prompt_len - hit(p.replica_id), KV, cfg)

    p = min(prefills, key=lambda p: (ttft(p), p.replica_id))
    local_uncached = r.prompt_len - hit(d.replica_id)
    local_s = local_uncached / d.prefill_tokens_per_s + d.decode_step_s
    if local_uncached > cfg.local_prefill_max_tokens:
        return p.replica_id, d.replica_id, "local_over_limit" if local_s <= ttft(p) else "remote_cheaper"
    if local_s <= ttft(p):
        return None, d.replica_id, "local_cheaper"
    return p.replica_id, d.replica_id, "remote_cheaper"


@pytest.mark.parametrize("policy", ["cost", "least_loaded", "prefix_aware"])
def test_pruned_search_equals_brute_force(policy):
    rng = random.Random(7)
    cfg = config()
    for trial in range(400):
        replicas = []
        for i in range(rng.randint(1, 12)):
            replicas.append(
                pre(
                    f"p{rng.randint(0, 99):02d}-{i}",
                    pending=rng.choice([0, 0, 100, 500, 2000, rng.randint(0, 8000)]),
                    speed=rng.choice([0.0, 10000.0, 10000.0, 25000.0]),
                    model=rng.choice(["m", "m", "other"]),
                    healthy=rng.random() > 0.1,
                    draining=rng.random() < 0.1,
                    node_id=rng.choice(["", "n1", "n2"]),
                    updated_at=NOW - rng.choice([0.0, 1.0, 9.0]),
                )
            )
        for i in range(rng.randint(1, 12)):
            replicas.append(
                dec(
                    f"d{rng.randint(0, 99):02d}-{i}",
                    running=rng.choice([0, 0, 8, 32, 63, 64]),
                    waiting=rng.choice([0, 0, 2]),
                    free=rng.choice([1000, 1000, 900, 500, 50]),
                    model=rng.choice(["m", "m", "other"]),
                    healthy=rng.random() > 0.1,
                    node_id=rng.choice(["", "n1", "n2"]),
                    updated_at=NOW - rng.choice([0.0, 1.0, 9.0]),
                )
            )
        rng.shuffle(replicas)
        s = snap(*replicas)
        ids = [x.replica_id for x in replicas]
        matches = {rid: rng.randint(1, 70) for rid in rng.sample(ids, k=rng.randint(0, len(ids)))}
        r = req(prompt_len=rng.choice([16, 300, 1024, 3000]), max_tokens=rng.choice([1, 256]))
        try:
            expected = _reference(policy, r, s, matches, cfg, PolicyState())
        except ValueError:  # min() of no usable decode replica
            with pytest.raises(NoCapacityError):
                place(policy, r, s, matches, cfg)
            continue
        got = place(policy, r, s, matches, cfg)
        assert (got.prefill_replica, got.decode_replica, got.reason) == expected, trial


# -- LoRA adapters: replicas holding the request's adapter are preferred --------------
def test_decode_prefers_the_replica_holding_the_adapter_within_its_weight():
    # load = max((running + 1) / 64, used blocks / total): d1 0.25, d2 0.125 (no adapter)
    holds = dec("d1", running=15, adapters=frozenset({"A"}))
    idle = dec("d2", running=7, host_adapters=frozenset({"A"}))
    s = snap(holds, idle)
    assert place("cost", req(), s).decode_replica == "d2"  # a base request: the lighter one
    # the adapter's miss costs 0.2 (host memory: 0.1): 0.25 < 0.125 + 0.1? no; 0.125 + 0.2? yes
    assert place("cost", req(adapter="B"), s).decode_replica == "d2"  # neither holds B
    assert place("cost", req(adapter="A"), s).decode_replica == "d2"  # 0.225 < 0.25
    cold = dec("d2", running=7)
    assert place("cost", req(adapter="A"), snap(holds, cold)).decode_replica == "d1"  # 0.25 < 0.325
    # a much lighter replica still wins over holding the adapter
    empty = dec("d2", running=0)
    assert place("cost", req(adapter="A"), snap(holds, empty)).decode_replica == "d2"
    assert place("cost", req(adapter="A"), snap(holds, cold),
                 cfg=config(adapter_miss_weight=0.0)).decode_replica == "d2"


def test_prefill_ttft_counts_bringing_the_adapter_in():
    d = dec("d1")
    p_slot = pre("p1", pending=300, adapters=frozenset({"A"}))
    p_cold = pre("p2", pending=0)
    cfg = config(local_prefill_max_tokens=0, adapter_load_s=0.05)
    base = place("cost", req(), snap(d, p_slot, p_cold), cfg=cfg)
    assert base.prefill_replica == "p2"  # 30 ms less queue
    got = place("cost", req(adapter="A"), snap(d, p_slot, p_cold), cfg=cfg)
    assert got.prefill_replica == "p1"  # its 30 ms queue beats p2's 50 ms load
    assert got.predicted_ttft_s == pytest.approx(remote_ttft_s(
        p_slot, d, 256, 256, KV, cfg))
