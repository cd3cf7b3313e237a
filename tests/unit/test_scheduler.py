"""Scheduler decisions on plain integers: budgets, chunking, preemption."""

from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import FinishReason, Sequence, SequenceStatus


def make(num_blocks=16, bs=4, max_seqs=8, budget=16):
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=False)
    return kv, Scheduler(kv, max_seqs, budget)


def run_step(s, sample=100):
    """Schedule, 'run', and append a token to sequences that completed."""
    out = s.schedule()
    done = [x.seq for x in out.scheduled if x.completes]
    s.commit(out)
    for seq in done:
        seq.append_token(sample)
    return [(x.seq.seq_id, x.num_new_tokens) for x in out.scheduled], out


def test_chunked_prefill_under_budget_then_decode():
    kv, s = make(budget=8)
    a = Sequence("a", list(range(10)), None, 4)
    b = Sequence("b", list(range(3)), None, 4)
    s.add(a)
    s.add(b)
    assert run_step(s)[0] == [("a", 8)]  # a's first chunk takes the whole budget
    assert run_step(s)[0] == [("a", 2), ("b", 3)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 1
    assert run_step(s)[0] == [("a", 1), ("b", 1)]  # both decoding
    assert kv.block_table("a").block_ids == (0, 1, 2)
    assert kv.block_table("b").block_ids == (3,)


def test_max_num_seqs_caps_running():
    kv, s = make(max_seqs=2)
    for i in range(3):
        s.add(Sequence(f"s{i}", [1, 2], None, 4))
    sched, _ = run_step(s)
    assert [x[0] for x in sched] == ["s0", "s1"]
    assert len(s.waiting) == 1
    s.finish(s.running[0], FinishReason.STOP)
    sched, _ = run_step(s)
    assert sched == [("s1", 1), ("s2", 2)]


def test_preemption_by_recompute_frees_last_admitted():
    # 4 blocks of 4 tokens: two prompts of 8 tokens fill all of them
    kv, s = make(num_blocks=4, budget=64)
    a = Sequence("a", list(range(8)), None, 4)
    b = Sequence("b", list(range(8)), None, 4)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, pool full
    assert kv.num_free_blocks == 0
    sched, out = run_step(s)  # a needs a 3rd block: b is preempted
    assert [x.seq_id for x in out.preempted] == ["b"]
    assert sched == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and s.waiting[0] is b
    assert kv.block_table("a").block_ids == (0, 1, 2)
    # b keeps its prompt and its output token, and is recomputed later
    assert b.token_ids == list(range(8)) + [100]
    s.finish(a, FinishReason.STOP)
    sched, _ = run_step(s)
    assert sched == [("b", 9)]
    s.finish(b, FinishReason.STOP)
    assert kv.all_free()


def test_self_preemption_when_alone_and_full():
    kv, s = make(num_blocks=2, budget=64)
    a = Sequence("a", list(range(8)), None, 4)
    s.add(a)
    run_step(s)  # 8 tokens computed, 2 blocks, one output token appended
    sched, out = run_step(s)
    assert sched == [] and [x.seq_id for x in out.preempted] == ["a"]
    assert kv.all_free()


def test_abort_waiting_and_running():
    kv, s = make()
    a = Sequence("a", [1, 2, 3], None, 4)
    b = Sequence("b", [1, 2, 3], None, 4)
    s.add(a)
    run_step(s)
    s.add(b)
    s.finish(b, FinishReason.ABORT)
    s.finish(a, FinishReason.ABORT)
    assert not s.has_unfinished()
    assert a.finish_reason is FinishReason.ABORT
    assert kv.all_free()


def test_first_scheduled_time_marks_the_end_of_queueing():
    kv, s = make(max_seqs=1)
    a, b = Sequence("a", [1, 2], None, 4), Sequence("b", [3, 4], None, 4)
    s.add(a)
    s.add(b)
    run_step(s)
    assert a.first_scheduled_time is not None and a.first_scheduled_time >= a.arrival_time
    assert b.first_scheduled_time is None  # still waiting for a slot
    s.finish(a, FinishReason.STOP)
    run_step(s)
    assert b.first_scheduled_time >= a.first_scheduled_time
    stamped = b.first_scheduled_time
    s._preempt(b)  # back to waiting: the first admission stays the mark
    run_step(s)
    assert b.first_scheduled_time == stamped


def _imported(kv, seq_id, n, bs=4):
    """A hand-off import: blocks reserved and the prompt's KV computed, first token sampled."""
    seq = Sequence(seq_id, list(range(n)), None, bs)
    assert kv.reserve(seq_id, [], n) is not None
    seq.num_computed_tokens = n
    seq.append_token(100)
    return seq


def test_hand_off_imports_never_push_the_batch_past_max_num_seqs():
    # imports arrive while the batch is full: they wait, blocks held, and
    # join as running sequences finish, oldest first
    kv, s = make(num_blocks=16, max_seqs=2)
    seqs = [_imported(kv, f"h{i}", 3) for i in range(4)]
    for seq in seqs:
        s.add_running(seq)
    assert len(s.running) <= 2
    sched, _ = run_step(s)
    assert [x[0] for x in sched] == ["h0", "h1"]
    assert all(seq.status is SequenceStatus.RUNNING for seq in seqs)
    s.finish(seqs[0], FinishReason.STOP)
    sched, _ = run_step(s)
    assert [x[0] for x in sched] == ["h1", "h2"]
    assert len(s.running) == 2 and [q.seq_id for q in s.parked] == ["h3"]
    assert kv.has_owner("h3")  # its blocks stay held while it waits


def test_waiting_prompts_queue_behind_imports_held_for_a_batch_slot():
    kv, s = make(num_blocks=16, max_seqs=1)
    s.add_running(_imported(kv, "h0", 3))
    s.add_running(_imported(kv, "h1", 3))
    s.add(Sequence("p", [1, 2], None, 4))
    run_step(s)
    s.finish(s.running[0], FinishReason.STOP)
    sched, _ = run_step(s)
    assert sched == [("h1", 1)]  # the held import first: its KV is already here
    assert [q.seq_id for q in s.waiting] == ["p"]
