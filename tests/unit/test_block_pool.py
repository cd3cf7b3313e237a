"""Exact block accounting: allocation, prefix hits, LRU eviction, leaks."""

import pytest

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.errors import OutOfBlocksError
from splitserve.engine.hashing import block_hashes, hash_block, ROOT_HASH
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.sequence import Sequence


def seq(sid, tokens, bs=4):
    return Sequence(sid, tokens, None, bs)


def test_hashes_are_chained_and_deterministic():
    toks = list(range(10))
    hs = block_hashes(toks, 4)
    assert len(hs) == 2  # only full blocks
    assert hs[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert hs[1] == hash_block(hs[0], [4, 5, 6, 7])
    # same tokens in block 2 but a different first block -> different hash
    assert block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hs[1]
    # fixed value: deterministic across processes and machines
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == hash_block(0, (1, 2, 3, 4))
    assert block_hashes(toks, 4, salt=b"m1") != block_hashes(toks, 4, salt=b"m2")


def test_pool_allocate_release_order():
    p = BlockPool(4)
    assert [p.allocate() for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(OutOfBlocksError):
        p.allocate()
    p.release(2)
    p.release(0)
    # uncached blocks are reused most-recently-released first (front)
    assert p.allocate() == 0
    assert p.allocate() == 2
    for b in range(4):
        p.release(b)
    p.check_invariants()
    assert p.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        p.release(1)


def test_cached_free_blocks_evicted_lru():
    p = BlockPool(3)
    a, b, c = p.allocate(), p.allocate(), p.allocate()
    p.set_hash(a, 111)
    p.set_hash(b, 222)
    p.release(a)  # cached, freed first -> evicted first
    p.release(b)
    p.release(c)  # uncached -> reused before any cached block
    assert p.allocate() == c
    assert p.lookup(111) == a
    assert p.allocate() == a  # LRU cached block goes next; its content is evicted
    assert p.lookup(111) is None and p.lookup(222) == b
    ev = p.drain_events()
    assert ev.stored == [111, 222] and ev.evicted == [111]
    p.check_invariants()


def test_events_past_the_bound_turn_the_next_drain_into_a_snapshot():
    p = BlockPool(4, max_events=5)
    blocks = [p.allocate() for _ in range(4)]
    for b, h in zip(blocks, (10, 20, 30, 40)):
        p.set_hash(b, h)
    for b in blocks:
        p.release(b)
    x, y = p.allocate(), p.allocate()  # evicts 10 and 20: 6 events > 5
    assert len(p._events) == 0  # nothing more is kept once a snapshot is due
    p.set_hash(x, 50)
    ev = p.drain_events()
    assert ev.snapshot and ev.evicted == []
    assert sorted(ev.stored) == [30, 40, 50] == sorted(p.hash_to_block)
    # the drain after a snapshot is a delta again
    p.set_hash(y, 60)
    ev = p.drain_events()
    assert not ev.snapshot and ev.stored == [60] and ev.evicted == []
    p.release(x)
    p.release(y)
    p.check_invariants()


def test_undrained_events_stay_bounded():
    p = BlockPool(2)  # default bound: max(4 * blocks, 1024)
    for i in range(10_000):
        b = p.allocate()
        p.set_hash(b, 1000 + i)
        p.release(b)
        assert len(p._events) <= p.max_events == 1024
    ev = p.drain_events()
    assert ev.snapshot and sorted(ev.stored) == sorted(p.hash_to_block)


def test_requested_snapshot_reports_the_whole_cache():
    p = BlockPool(3)
    a, b = p.allocate(), p.allocate()
    p.set_hash(a, 7)
    p.set_hash(b, 8)
    assert p.drain_events().stored == [7, 8]
    p.request_snapshot()  # e.g. the router restarted and lost the deltas
    ev = p.drain_events()
    assert ev.snapshot and ev.stored == [7, 8] and ev.evicted == []
    assert not p.drain_events().snapshot
    p.release(a)
    p.release(b)
    p.check_invariants()
    with pytest.raises(ValueError, match="max_events"):
        BlockPool(3, max_events=0)


def test_prefix_hit_reuses_exact_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s1 = seq("a", list(range(10)))
    assert kv.allocate_prompt(s1, 100) == 10
    assert kv.block_table("a").block_ids == (0, 1, 2)
    s1.num_computed_tokens = 10
    kv.cache_full_blocks(s1)
    # same 8-token prefix: two full blocks hit, the rest is computed
    s2 = seq("b", list(range(8)) + [77, 78, 79])
    assert kv.allocate_prompt(s2, 100) == 3
    assert s2.num_computed_tokens == 8 and s2.num_cached_tokens == 8
    assert kv.block_table("b").block_ids == (0, 1, 3)
    assert kv.pool.ref_counts[:4] == [2, 2, 1, 1]
    # exactly 8 tokens: only the first block may hit; one token must run
    s3 = seq("c", list(range(8)))
    assert kv.allocate_prompt(s3, 100) == 4
    assert kv.block_table("c").block_ids == (0, 4)
    kv.check_invariants()
    for sid in ("a", "b", "c"):
        kv.free(sid)
    kv.check_invariants()
    assert kv.all_free()


def test_freed_prefix_stays_cached_until_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    s1 = seq("a", list(range(9)))
    kv.allocate_prompt(s1, 100)
    s1.num_computed_tokens = 9
    kv.cache_full_blocks(s1)
    kv.free("a")
    assert kv.all_free()
    s2 = seq("b", list(range(9)))
    assert kv.allocate_prompt(s2, 100) == 1  # both full blocks hit while free
    assert kv.block_table("b").block_ids == (0, 1, 2)
    kv.free("b")
    # a request for all 4 blocks evicts the cached content
    s3 = seq("c", [50 + i for i in range(16)])
    assert kv.allocate_prompt(s3, 100) == 16
    assert kv.pool.lookup(block_hashes(list(range(9)), 4)[0]) is None
    kv.free("c")
    assert kv.all_free()


def test_allocate_fails_cleanly_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s1 = seq("a", list(range(12)))
    assert kv.allocate_prompt(s1, 100) == 0  # needs 3 blocks: nothing held
    assert kv.all_free()
    assert kv.allocate_prompt(s1, 8) == 8  # chunk that fits
    s1.num_computed_tokens = 8
    assert not kv.allocate_more(s1, 4)
    kv.free("a")
    assert kv.all_free()


def test_reservation_counts_cached_prefix():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    s1 = seq("a", list(range(8)) + [5])
    kv.allocate_prompt(s1, 100)
    s1.num_computed_tokens = 9
    kv.cache_full_blocks(s1)
    kv.free("a")
    toks = list(range(8)) + [1, 2]
    ids, cached = kv.reserve("h1", block_hashes(toks, 4), len(toks))
    assert ids == [0, 1, 2] and cached == 8  # block 2 was uncached: reused first
    assert kv.block_table("h1").block_ids == (0, 1, 2)
    assert kv.reserve("h2", [], 40) is None
    kv.free("h1")
    kv.check_invariants()
    assert kv.all_free()


def test_bulk_operations_equal_their_single_steps():
    """allocate_many / release_many / set_hashes leave a pool exactly as the
    same single calls do: free order, cached hashes, events."""
    import random

    rng = random.Random(1)
    bulk, single = BlockPool(24, max_events=40), BlockPool(24, max_events=40)
    held: list[int] = []
    for step in range(400):
        op = rng.random()
        if op < 0.4 and bulk.num_free_blocks:
            n = rng.randint(1, bulk.num_free_blocks)
            got = bulk.allocate_many(n)
            assert got == [single.allocate() for _ in range(n)]
            held += got
        elif op < 0.7 and held:
            some = rng.sample(held, rng.randint(1, len(held)))
            bulk.release_many(some)
            for b in some:
                single.release(b)
                held.remove(b)
        elif held:
            ids = rng.sample(held, rng.randint(1, len(held)))
            hashes = [rng.randrange(60) for _ in ids]
            bulk.set_hashes(ids, hashes)
            for b, h in zip(ids, hashes):
                single.set_hash(b, h)
        if step % 37 == 0:
            a, b = bulk.drain_events(), single.drain_events()
            assert (a.stored, a.evicted, a.snapshot) == (b.stored, b.evicted, b.snapshot)
        assert list(bulk._free) == list(single._free)
        assert bulk.block_hash == single.block_hash and bulk.ref_counts == single.ref_counts
        bulk.check_invariants()
    with pytest.raises(OutOfBlocksError):
        bulk.allocate_many(bulk.num_free_blocks + 1)
