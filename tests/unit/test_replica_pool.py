"""ReplicaPool keeps the orders policies read; RouterCore's snapshots built
from it decide exactly as snapshots derived from scratch."""

import dataclasses
import random

from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.core import RouterCore
from splitserve.router.policies import get_policy
from splitserve.router.replica_pool import ReplicaPool, make_live_snapshot, make_snapshot
from splitserve.router.types import (
    ClusterSnapshot,
    DecodeReplicaStats,
    NoCapacityError,
    PrefillReplicaStats,
    RouteRequest,
    load_order,
    load_rank,
    queue_order,
    queue_rank,
)

NOW = 1000.0


def pre(rng: random.Random, rid: str, at: float = NOW) -> PrefillReplicaStats:
    return PrefillReplicaStats(
        replica_id=rid,
        model="m",
        pending_prompt_tokens=rng.choice([0, 0, 512, rng.randint(0, 20000)]),
        running_requests=rng.randint(0, 8),
        prefill_tokens_per_s=rng.choice([0.0, 5000.0, rng.uniform(4000, 6000)]),
        node_id=rng.choice(["", "n0", "n1"]),
        updated_at=at,
    )


def dec(rng: random.Random, rid: str, at: float = NOW) -> DecodeReplicaStats:
    return DecodeReplicaStats(
        replica_id=rid,
        model="m",
        free_blocks=rng.choice([0, 40, rng.randint(0, 400)]),
        total_blocks=400,
        running_seqs=rng.randint(0, 16),
        max_seqs=16,
        block_size=16,
        waiting_requests=rng.randint(0, 2),
        decode_step_s=0.01,
        prefill_tokens_per_s=4000.0,
        node_id=rng.choice(["", "n0", "n1"]),
        updated_at=at,
    )


def test_pool_orders_match_a_fresh_sort_under_churn():
    rng = random.Random(3)
    pool: ReplicaPool[DecodeReplicaStats] = ReplicaPool(load_rank)
    held: dict[str, DecodeReplicaStats] = {}
    for step in range(600):
        rid = f"d{rng.randrange(12):02d}"
        if rng.random() < 0.2:
            assert pool.pop(rid) == held.pop(rid, None)
        else:
            held[rid] = dec(rng, rid)
            pool.put(held[rid])
        by_id, as_dict, ordered, _ = pool.views()
        assert [d.replica_id for d in by_id] == sorted(held)
        assert dict(as_dict) == held
        assert list(ordered) == sorted(held.values(), key=load_order)
        assert len(pool) == len(held)
        assert all(rid in pool for rid in held)
        # per node (a replica's node may change between pushes), in ranking order
        nodes = {d.node_id for d in held.values() if d.node_id}
        assert dict(pool.by_node()) == {
            n: tuple(sorted((d for d in held.values() if d.node_id == n), key=load_order))
            for n in nodes}


def test_views_are_shared_until_the_pool_changes():
    rng = random.Random(4)
    pool: ReplicaPool[PrefillReplicaStats] = ReplicaPool(queue_rank)
    for i in range(4):
        pool.put(pre(rng, f"p{i}"))
    first = pool.views()
    assert pool.views() is first
    fast = dataclasses.replace(pool.get("p2"), prefill_tokens_per_s=9000.0)
    pool.put(fast)
    second = pool.views()
    assert second is not first and second[3] == 9000.0
    assert first[1]["p2"].prefill_tokens_per_s != 9000.0  # old views stay as they were
    pool.pop("p2")
    assert pool.views()[3] == max(p.prefill_tokens_per_s for p in pool)
    nodes = pool.by_node()
    assert pool.by_node() is nodes
    pool.put(dataclasses.replace(pool.get("p1"), node_id="n9"))
    assert pool.by_node() is not nodes and "n9" not in nodes  # old copies stay as they were


def test_live_snapshot_sets_every_field_as_the_copying_one():
    """make_live_snapshot fills the snapshot slot by slot: every field is
    set, to the same contents as make_snapshot's copies."""
    rng = random.Random(8)
    prefill: ReplicaPool[PrefillReplicaStats] = ReplicaPool(queue_rank)
    decode: ReplicaPool[DecodeReplicaStats] = ReplicaPool(load_rank, track_nodes=False)
    for i in range(5):
        prefill.put(pre(rng, f"p{i}"))
        decode.put(dec(rng, f"d{i}"))
    live, copied = make_live_snapshot(prefill, decode, NOW), make_snapshot(prefill, decode, NOW)
    for f in dataclasses.fields(ClusterSnapshot):
        got, want = getattr(live, f.name), getattr(copied, f.name)  # unset: AttributeError
        if f.name in ("prefill", "decode", "prefill_by_queue", "decode_by_load"):
            got, want = tuple(got), tuple(want)
        elif f.name in ("prefill_by_id", "decode_by_id", "prefill_by_node"):
            got, want = dict(got), dict(want)
        assert got == want, f.name


def test_counting_copies_every_other_field():
    rng = random.Random(5)
    d = dec(rng, "d")
    assert d.counting(free_blocks=3, waiting_requests=2, pending_prefill_tokens=7) == dataclasses.replace(
        d, free_blocks=3, waiting_requests=2, pending_prefill_tokens=7
    )
    p = pre(rng, "p")
    assert p.counting(pending_prompt_tokens=99) == dataclasses.replace(p, pending_prompt_tokens=99)
    assert p.counting(pending_prompt_tokens=99).queue_s == dataclasses.replace(
        p, pending_prompt_tokens=99
    ).queue_s


def test_router_core_decides_as_on_a_snapshot_derived_from_scratch():
    """Many routes (each changes two replicas' estimates) and pushes: every
    placement equals the policy's choice on a snapshot that sorts afresh."""
    rng = random.Random(6)
    for policy in ("cost", "prefix_aware", "least_loaded"):
        cfg = RouterConfig(policy=policy, models={"m": ModelFacts(16, 131072)})
        router = RouterCore(cfg, clock=lambda: NOW)
        for i in range(8):
            router.update_stats(pre(rng, f"p{i}"))
            router.update_stats(dec(rng, f"d{i}"))
        fn = get_policy(policy)
        for step in range(300):
            if step % 7 == 0:
                maker = pre if rng.random() < 0.5 else dec
                router.update_stats(maker(rng, f"{maker.__name__[0]}{rng.randrange(10)}", NOW + step))
            r = RouteRequest(f"r{step}", "m", rng.randint(1, 2000), rng.randint(1, 500), block_hashes=())
            live = router.snapshot("m")
            fresh = ClusterSnapshot(prefill=live.prefill, decode=live.decode, now=live.now)
            try:
                expected = fn(r, fresh, {}, cfg, router.state)
            except NoCapacityError:
                expected = None
            try:
                got = router.route(r)
            except NoCapacityError:
                got = None
            assert got == expected, (policy, step)
