"""PrefixIndex: chained matching per replica, events, and the LRU bound."""

import random

import pytest

from splitserve.engine.hashing import block_hashes
from splitserve.router.prefix_index import PrefixIndex

BLOCK = 4


def chain(tag: int, n: int) -> list[int]:
    """n chained block hashes of a prompt unique to ``tag``."""
    return block_hashes([tag * 1000 + i for i in range(n * BLOCK)], BLOCK)


def test_match_stops_at_first_missing_block_per_replica():
    h = chain(1, 5)
    index = PrefixIndex(max_entries=100)
    index.on_stored("a", h[:4])
    index.on_stored("b", h[:2])
    index.on_stored("c", h[1:])  # c lacks the first block: no prefix at all
    assert index.match(h) == {"a": 4, "b": 2}
    assert index.match(h[:1]) == {"a": 1, "b": 1}
    assert index.match(h[:3]) == {"a": 3, "b": 2}
    assert index.match(chain(2, 3)) == {}
    assert index.match([]) == {}


def test_match_finds_every_change_of_holders_on_a_long_chain():
    h = chain(9, 200)
    depths = {"r0": 200, "r1": 157, "r2": 64, "r3": 63, "r4": 1, "r5": 100}
    index = PrefixIndex(max_entries=10_000)
    for replica, depth in depths.items():
        index.on_stored(replica, h[:depth])
    assert index.match(h) == depths
    assert index.match(h[:64]) == {r: min(d, 64) for r, d in depths.items()}
    longer = h + chain(10, 3)  # the chain goes on past every cached block
    assert index.match(longer) == depths
    index.on_evicted("r0", h[150:])  # tail blocks go first, as in an engine
    assert index.match(h)["r0"] == 150


def test_match_on_engine_hashes_of_shared_prompt_prefix():
    system = list(range(100, 100 + 3 * BLOCK))  # 3 shared blocks
    first = block_hashes(system + [7] * (2 * BLOCK), BLOCK)
    second = block_hashes(system + [8] * (2 * BLOCK) + [9], BLOCK)
    index = PrefixIndex(max_entries=100)
    index.on_stored("r1", first)
    assert index.match(second) == {"r1": 3}
    assert index.match(first) == {"r1": 5}


def test_evicted_and_dropped_replicas_stop_matching():
    h = chain(3, 4)
    index = PrefixIndex(max_entries=100)
    index.on_stored("a", h)
    index.on_stored("b", h)
    index.on_evicted("a", [h[2]])
    assert index.match(h) == {"a": 2, "b": 4}
    assert index.num_blocks("a") == 3
    index.drop_replica("b")
    assert index.match(h) == {"a": 2}
    assert index.num_blocks("b") == 0
    assert index.holders(h[2]) == frozenset()  # nobody holds it: entry gone
    assert index.holders(h[3]) == frozenset({"a"})
    assert len(index) == 3
    index.on_evicted("unknown", h)  # events of a replica never seen are harmless
    assert len(index) == 3


def test_lru_evicts_least_recently_touched_leaves_first():
    a, b = chain(4, 5), chain(5, 5)
    index = PrefixIndex(max_entries=8)
    index.on_stored("ra", a)
    index.on_stored("rb", b)
    # 10 hashes into 8 slots: the oldest are a's last two blocks (a chain is
    # touched from its leaf back to its root, so the root stays freshest).
    assert len(index) == 8
    assert index.match(a) == {"ra": 3}
    assert index.num_blocks("ra") == 3
    assert index.match(b) == {"rb": 5}


def test_match_refreshes_lru_order():
    a, b, c = chain(6, 3), chain(7, 3), chain(8, 2)
    index = PrefixIndex(max_entries=6)
    index.on_stored("ra", a)
    index.on_stored("rb", b)
    index.match(a)  # a is now fresher than b
    index.on_stored("rc", c)  # evicts b's two leaves, not a's
    assert index.match(a) == {"ra": 3}
    assert index.match(b) == {"rb": 1}
    assert index.match(c) == {"rc": 2}


def reference_match(index: PrefixIndex, hashes: list[int], replicas: list[str]) -> dict[str, int]:
    """Per replica, walk the chain until the first block it does not hold."""
    out = {}
    for r in replicas:
        depth = 0
        while depth < len(hashes) and r in index.holders(hashes[depth]):
            depth += 1
        if depth:
            out[r] = depth
    return out


def test_bound_and_consistency_under_random_churn():
    rng = random.Random(0)
    # Prefixes of a few long chains, so replicas hold overlapping chains of
    # different lengths. A replica evicts a chain's tail, never a block whose
    # child it keeps (as an engine's block pool does), while the index's own
    # bound evicts whole entries.
    bases = [chain(100 + i, 12) for i in range(8)]
    chains = [b[: rng.randint(1, 12)] for b in bases for _ in range(4)]
    replicas = [f"r{i}" for i in range(6)]
    index = PrefixIndex(max_entries=50)
    seen: set[int] = set()
    for _ in range(2000):
        op = rng.random()
        r, c = rng.choice(replicas), rng.choice(chains)
        if op < 0.6:
            index.on_stored(r, c)
            seen.update(c)
        elif op < 0.85:
            base = bases[chains.index(c) // 4]
            index.on_evicted(r, base[rng.randrange(len(base)):])
        elif op < 0.97:
            assert index.match(c) == reference_match(index, c, replicas)
        else:
            index.drop_replica(r)
        assert len(index) <= 50
        if _ % 50 == 0:
            check_consistent(index, seen, replicas)
    check_consistent(index, seen, replicas)


def check_consistent(index, seen, replicas):
    # Both directions of the index agree: every membership counted once.
    memberships = sum(len(index.holders(h)) for h in seen)
    assert memberships == sum(index.num_blocks(r) for r in replicas)
    assert sum(1 for h in seen if index.holders(h)) == len(index)
    # Equal holder sets are one shared object, and only live ones are kept.
    live = [index.holders(h) for h in seen if index.holders(h)]
    assert len({id(s) for s in live}) == len(set(live)) == index.num_holder_sets()


def test_storing_a_chain_held_by_several_holder_sets_interns_each_union_once():
    h = chain(3, 9)
    index = PrefixIndex(max_entries=100)
    index.on_stored("a", h[:6])
    index.on_stored("b", h[:3])  # holders: {a, b} x 3, {a} x 3
    index.on_stored("c", h[:9])  # {a, b, c} x 3, {a, c} x 3, {c} x 3
    index.on_stored("c", h[:9])  # again: nothing changes
    assert index.match(h) == {"a": 6, "b": 3, "c": 9}
    check_consistent(index, h, ["a", "b", "c"])
    assert index.num_holder_sets() == 3
    index.on_evicted("c", h[3:])
    assert index.match(h) == {"a": 6, "b": 3, "c": 3}
    check_consistent(index, h, ["a", "b", "c"])
    assert index.num_holder_sets() == 2  # {a, b, c} and {a}


def test_max_entries_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        PrefixIndex(max_entries=0)


def test_sampled_refresh_keeps_a_hot_prefix_and_ages_a_cold_one():
    hot, cold = chain(20, 4), chain(21, 4)
    index = PrefixIndex(max_entries=40, touch_fraction=0.25, seed=1)
    index.on_stored("r", cold)
    index.on_stored("r", hot)
    for i in range(30):  # new chains push old entries out; hot is asked for every time
        assert index.match(hot) == {"r": 4}
        index.on_stored("r", chain(100 + i, 2))
    assert index.match(hot) == {"r": 4}
    assert index.match(cold) == {}


def test_touch_fraction_must_be_a_share():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="touch_fraction"):
            PrefixIndex(max_entries=10, touch_fraction=bad)
