"""Recurrent-state checkpoints on plain integers: the pool's LRU, where the
scheduler takes them, hits that need both the KV blocks and a checkpoint,
and the accounting (no model: copies are recorded)."""

import pytest

from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import FinishReason, Sequence
from splitserve.engine.state_cache import StateSlots
from splitserve.engine.state_checkpoints import StateCheckpoints


def test_pool_keeps_the_most_recently_used():
    copies = []
    pool = StateCheckpoints(4, 2, lambda src, dst: copies.append((src, dst)))
    pool.save(11, 0)
    pool.save(22, 1)
    assert copies == [(0, 4), (1, 5)]
    pool.save(11, 3)  # held already: the same prefix's state, only its recency moves
    assert copies == [(0, 4), (1, 5)]
    pool.save(33, 2)  # every slot taken: 22, least recently used, gives its slot
    assert copies[-1] == (2, 5) and 22 not in pool and len(pool) == 2
    assert pool.longest([11, 22, 33], 3) == 3 and pool.longest([11, 22, 33], 2) == 1
    assert pool.longest([22, 44], 2) == 0
    assert pool.take(11) == 4 and pool.restored == 1 and pool.holds(4)
    pool.save(44, 0)  # 33 is now the oldest
    assert 33 not in pool and 11 in pool and pool.accounted()
    with pytest.raises(ValueError, match="at least one slot"):
        StateCheckpoints(4, 0, lambda s, d: None)


def make(num_blocks=16, budget=16, checkpoints=2):
    copies = []
    kv = KVCacheManager(num_blocks, 4, True, StateSlots(2),
                        StateCheckpoints(2, checkpoints, lambda s, d: copies.append((s, d))))
    return kv, Scheduler(kv, 2, budget), copies


def run(s, seqs):
    """Schedule and 'run' until every sequence has one output token."""
    for seq in seqs:
        s.add(seq)
    chunks = []
    while any(q.num_output_tokens == 0 for q in seqs):
        out = s.schedule()
        done = [x.seq for x in out.scheduled if x.completes]
        s.commit(out)
        chunks += [(x.seq.seq_id, x.num_new_tokens) for x in out.scheduled]
        for q in done:
            q.append_token(7)
    return chunks


def test_chunks_end_on_block_boundaries_and_leave_checkpoints():
    kv, s, copies = make()
    a = Sequence("a", list(range(1, 11)), None, 4)
    # the prompt's last full block ends at 8: the chunk stops there, the tail follows
    assert run(s, [a]) == [("a", 8), ("a", 2)]
    assert copies == [(kv.state_slot("a"), 2)] and a.block_hashes()[1] in kv.checkpoints
    s.finish(a, FinishReason.STOP)
    # the same head: resumes at 8, its state copied from the checkpoint before its first chunk
    b = Sequence("b", list(range(1, 9)) + [50, 51, 52], None, 4)
    s.add(b)
    out = s.schedule()
    assert [(x.seq.seq_id, x.num_new_tokens) for x in out.scheduled] == [("b", 3)]
    assert b.num_cached_tokens == 8 and kv.restore_slot("b") == 2 and kv.checkpoints.restored == 1
    kv.check_invariants()
    s.commit(out)
    assert kv.restore_slot("b") is None  # its state has moved on
    s.finish(b, FinishReason.STOP)
    # a prompt of whole blocks checkpoints where it ends (a follow-up turn resends it)
    c = Sequence("c", list(range(60, 68)), None, 4)
    assert run(s, [c]) == [("c", 8)] and c.block_hashes()[1] in kv.checkpoints
    kv.check_invariants()
    s.finish(c, FinishReason.STOP)
    # aborted after its admission from a hit, before its chunk ran: nothing of it stays
    d = Sequence("d", list(range(1, 9)) + [70], None, 4)
    s.add(d)
    s.schedule()
    assert kv.restore_slot("d") == 2
    s.finish(d, FinishReason.ABORT)
    assert kv.restore_slot("d") is None and kv.all_free()


def test_budget_chunks_inside_the_prompt_end_on_boundaries():
    kv, s, _ = make(num_blocks=32, budget=10, checkpoints=4)
    a = Sequence("a", list(range(1, 24)), None, 4)
    assert run(s, [a]) == [("a", 8), ("a", 8), ("a", 4), ("a", 3)]
    assert all(h in kv.checkpoints for h in a.block_hashes()[1:5:2])


def test_a_checkpoint_without_its_kv_blocks_is_no_hit():
    kv, s, _ = make(num_blocks=6, checkpoints=4)
    a = Sequence("a", list(range(1, 11)), None, 4)
    run(s, [a])
    s.finish(a, FinishReason.STOP)
    # 23 other tokens take every block: a's cached blocks are evicted, its checkpoint stays
    other = Sequence("o", list(range(100, 123)), None, 4)
    run(s, [other])
    s.finish(other, FinishReason.STOP)
    assert a.block_hashes()[1] in kv.checkpoints and kv.pool.lookup(a.block_hashes()[1]) is None
    again = Sequence("a2", list(range(1, 11)), None, 4)
    run(s, [again])
    assert again.num_cached_tokens == 0 and kv.checkpoints.restored == 0
    kv.check_invariants()


def test_a_kv_hit_without_a_checkpoint_resumes_where_one_is():
    kv, s, _ = make(budget=64, checkpoints=1)
    a = Sequence("a", list(range(1, 14)), None, 4)
    assert run(s, [a]) == [("a", 12), ("a", 1)]  # checkpoint at 12 only; blocks 0..2 cached
    s.finish(a, FinishReason.STOP)
    b = Sequence("b", list(range(1, 10)) + [90, 91, 92, 93], None, 4)  # shares 2 blocks
    run(s, [b])
    assert b.num_cached_tokens == 0  # KV blocks for 8 tokens, no state there: computed in full
    s.finish(b, FinishReason.STOP)
    # a hand-off reservation counts cached blocks alone: the state comes with the hand-off
    ids, cached = kv.reserve("h", a.block_hashes(), 13)
    assert cached == 12
    kv.free("h")
    assert kv.all_free()


def test_prompt_logprobs_and_no_checkpoints_turn_hits_off():
    kv, s, _ = make()
    a = Sequence("a", list(range(1, 11)), None, 4)
    run(s, [a])
    s.finish(a, FinishReason.STOP)
    scored = Sequence("p", list(range(1, 11)), SamplingParams(prompt_logprobs=0), 4)
    run(s, [scored])
    assert scored.num_cached_tokens == 0  # every prompt token is computed, to be scored
    kv = KVCacheManager(16, 4, True, StateSlots(2))  # a hybrid model without checkpoints
    assert not kv.pool.enable_prefix_caching
    assert kv.chunk_tokens(Sequence("x", [1] * 10, None, 4), 0, 10) == 10
