"""A simulated replica runs the engine's own Scheduler and KV manager, and
coalescing decode steps changes nothing: the same tokens at the same times,
the same preemptions, the same blocks, as stepping token by token."""

import itertools
import random

import pytest

from splitserve.cluster.planning.sim.events import EventLoop
from splitserve.cluster.planning.sim.replica import SimReplica
from splitserve.cluster.planning.sim.sequence import SimSequence
from splitserve.cluster.planning.step_model import StepTimeModel
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.scheduler import Scheduler

# a memory form and a compute form: the run crosses from one to the other
MODEL = StepTimeModel(forms=((0.001, 1e-5, 1e-8, 2e-4, 1e-6), (0.004, 0, 0, 0, 3e-6)),
                      overhead_s=0.0005)
BS = 4


class Recorder:
    def __init__(self):
        self.events = []

    def on_first_token(self, rep, seq):
        self.events.append(("first", seq.seq_id, rep.loop.now))

    def on_finished(self, rep, seq):
        self.events.append(("finished", seq.seq_id, rep.loop.now, seq.num_output_tokens))

    def on_prefill_done(self, rep, seq):
        self.events.append(("prefilled", seq.seq_id, rep.loop.now))


def run(coalesce: bool, blocks: int, n: int, seed: int, max_seqs: int = 8):
    loop, rec = EventLoop(), Recorder()
    rep = SimReplica(loop, "r", "decode", "m", "node", MODEL, blocks, BS, max_seqs, 64, rec,
                     coalesce=coalesce)
    rng = random.Random(seed)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(20)
        plen, out, local = rng.randint(3, 30), rng.randint(1, 40), rng.random() < 0.3

        def arrive(_, i=i, plen=plen, out=out, local=local):
            seq = SimSequence(f"s{i}", plen, [hash((i, j)) for j in range(plen // BS)], BS, i,
                              out, loop.now)
            if local:  # a local prefill: the waiting queue
                rep.call(lambda: rep.sched.add(seq))
                return

            def commit():  # a hand-off: reserve, then admit the imported sequence
                if rep.kv.reserve(seq.seq_id, seq.block_hashes(), plen) is None:
                    rec.events.append(("refused", seq.seq_id, loop.now))
                    return
                rep.admit_imported(seq, plen)
            rep.call(commit)
        loop.at(t, arrive)

    def observe(_):  # what a stats push reads, between boundaries or on one
        rep.sync(loop.now)
        rec.events.append(("free", "-", loop.now, rep.kv.num_free_blocks, rep.pending_prompt_tokens(),
                           len(rep.sched.running)))
        if loop.now < t + 1.0:
            loop.after(0.0037, observe)
    loop.at(0.0, observe)
    loop.run(1e9)
    rep.kv.check_invariants()
    assert rep.kv.all_free() or rep.kv.owners() == []
    return rec.events, rep.step_count, rep.sched.num_preemptions, rep.busy_time_s, loop.processed


def same_events(a, b):
    """Equal kinds, ids and counts; times equal but for float rounding (a
    coalesced run sums step times in closed form)."""
    assert [(e[0], e[1]) + e[3:] for e in a] == [(e[0], e[1]) + e[3:] for e in b]
    assert [e[2] for e in a] == pytest.approx([e[2] for e in b], rel=1e-9, abs=1e-12)
    return True


def test_the_replica_is_made_of_the_engines_scheduler_and_kv_manager():
    rep = SimReplica(EventLoop(), "r", "decode", "m", "n", MODEL, 64, BS, 8, 64, Recorder())
    assert type(rep.sched) is Scheduler and type(rep.kv) is KVCacheManager
    assert rep.sched.kv is rep.kv


@pytest.mark.parametrize("seed,blocks", list(itertools.product(range(6), (30, 50, 300))))
def test_coalesced_decode_equals_step_by_step(seed, blocks):
    fast = run(True, blocks, 50, seed)
    slow = run(False, blocks, 50, seed)
    assert same_events(fast[0], slow[0])  # every first token, finish and refusal at the same time
    assert fast[1:3] == slow[1:3]  # steps and preemptions
    assert fast[3] == pytest.approx(slow[3], rel=1e-9)  # busy time


def test_preemption_happens_and_still_matches():
    preempted = [run(True, 30, 60, seed)[2] for seed in range(6)]
    assert sum(preempted) > 0
    fast, slow = run(True, 30, 60, 3), run(False, 30, 60, 3)
    assert same_events(fast[0], slow[0]) and fast[1:3] == slow[1:3]


def test_coalescing_processes_fewer_events_for_long_outputs():
    def long_run(coalesce):
        loop, rec = EventLoop(), Recorder()
        rep = SimReplica(loop, "r", "decode", "m", "n", MODEL, 4096, 16, 64, 512, rec,
                         coalesce=coalesce)
        for i in range(32):
            seq = SimSequence(f"s{i}", 100, [], 16, i, 1000, 0.0)
            rep.sched.add(seq)
        rep.kick()
        loop.run(1e9)
        return rec.events, loop.processed

    fast, slow = long_run(True), long_run(False)
    assert same_events(fast[0], slow[0])
    assert fast[1] * 5 < slow[1]


@pytest.mark.parametrize("seed", range(4))
def test_imports_held_for_a_batch_slot_match_and_never_exceed_max_num_seqs(seed):
    """With a small batch cap most hand-offs arrive while it is full: the
    scheduler parks them, a coalesced run stops when one can join, and the
    batch stays within ``max_num_seqs`` at every observation."""
    fast = run(True, 300, 50, seed, max_seqs=3)
    slow = run(False, 300, 50, seed, max_seqs=3)
    assert same_events(fast[0], slow[0]) and fast[1:3] == slow[1:3]
    running = [e[5] for e in fast[0] if e[0] == "free"]
    assert max(running) == 3
