"""Coalesced decode: a simulated replica's decode steps jumped over in runs.

While every running sequence is decoding and nothing can be admitted (no
waiting sequence, or ``max_num_seqs`` running), each step is fully
determined: every sequence gains one token and a block when it crosses a
block boundary. ``CoalescedRun`` then skips the per-step calls and jumps
from boundary to boundary where something happens: a sequence finishes, a
sequence needs a block (allocated through the replica's KV manager at that
step, so the pool is exact at every event), or a call arrives
(``wake_at_next_boundary``). A sequence's counts are brought up to date
("materialized") only at those boundaries; step durations over a run come
from the step-time model's closed form (``StepTimeModel.decode_run_s``).
When a block allocation fails, the run ends and the replica's production
``schedule()`` runs that step (and preempts). With speculation, a run is
entered only at batch sizes where the length rule cannot speculate
(``LengthRule.quiet``), so its steps are plain decode steps.

The run belongs to one ``SimReplica`` (``SimReplica.run``) and works on
its scheduler, KV manager, counters and event epoch; ``tests/unit/
test_planning_replica.py`` checks that coalesced and step-by-step runs give
identical token times.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from splitserve.cluster.planning.sim.sequence import SimSequence
from splitserve.engine.sequence import FinishReason

if TYPE_CHECKING:
    from splitserve.cluster.planning.sim.replica import SimReplica


class CoalescedRun:
    def __init__(self, rep: "SimReplica"):
        self.rep = rep
        self.active = False
        self._S = 0  # step index at the run's last boundary (= step_count there)
        self._t0 = 0.0  # its time
        self._B = 0  # sequences in the batch
        self._C = 0  # sum of their attention lengths at step _S
        self._lazy: dict[str, list] = {}  # seq_id -> [seq, s0, c0, order]
        self._fin: list[tuple[int, int, str]] = []  # (last step, order, seq_id)
        self._need: list[tuple[int, int, str]] = []  # (step needing a block, order, seq_id)
        self._order = 0
        self._planned = -1  # boundary of the next planned event

    def join(self, seq: SimSequence) -> None:
        """A sequence moved into the running batch during the run."""
        self._register(seq)
        self._B += 1
        self._C += seq.num_computed_tokens + 1

    def busy_s(self, now: float) -> float:
        """Seconds of the run since its last boundary."""
        return now - self._t0

    def steps_at(self, now: float) -> int:
        """Steps of the run completed by ``now``, past its last boundary's count."""
        return self.steps_done(now)[0]

    def produced_since(self, seq: SimSequence, now: float) -> int | None:
        """Output tokens ``seq`` produced by ``now`` beyond its counted ones
        (None: not in the run)."""
        entry = self._lazy.get(seq.seq_id)
        if entry is None:
            return None
        k, _ = self.steps_done(now)
        return max(0, self._S + k - entry[1])

    def possible(self) -> bool:
        rep = self.rep
        sched = rep.sched
        running = sched.running
        if not running or rep.calls:
            return False
        if (sched.waiting or sched.parked) and len(running) < sched.max_num_seqs:
            return False  # the next schedule() may admit
        if len(running) > sched.max_num_batched_tokens:
            return False  # not every sequence steps each time
        if rep.spec is not None and not rep.spec.quiet(len(running)):
            return False  # the rule may speculate at this batch size
        for seq in running:
            done = seq.num_computed_tokens
            if seq.num_tokens - done != 1 or done < seq.num_prompt_tokens or seq.prefill_only:
                return False
        return True

    def _register(self, seq: SimSequence) -> None:
        rep = self.rep
        order = self._order
        self._order += 1
        s0, c0 = self._S, seq.num_computed_tokens
        self._lazy[seq.seq_id] = [seq, s0, c0, order]
        heapq.heappush(self._fin, (s0 + seq.target_output - seq.num_output_tokens - 1, order,
                                   seq.seq_id))
        blocks = len(rep.kv.raw_block_ids(seq.seq_id))
        heapq.heappush(self._need, (s0 + max(0, blocks * rep.block_size - c0), order, seq.seq_id))

    def enter(self) -> None:
        rep = self.rep
        self.active = True
        rep.busy = True
        self._S = rep.step_count
        self._t0 = rep.loop.now
        self._lazy, self._fin, self._need = {}, [], []
        running = rep.sched.running
        self._B = len(running)
        self._C = sum(seq.num_computed_tokens + 1 for seq in running)
        for seq in running:
            self._register(seq)
        self._boundary(self._S)

    def _materialize(self, entry: list, b: int) -> SimSequence:
        rep = self.rep
        seq, s0, c0, _ = entry
        k = b - s0
        if k > 0:
            seq.token_ids.extend([0] * k)
            seq.num_computed_tokens = c0 + k
            entry[1], entry[2] = b, c0 + k
            rep.kv.cache_full_blocks(seq)
        return seq

    def _advance(self, b: int) -> None:
        rep = self.rep
        k = b - self._S
        if k <= 0:
            return
        dt = rep.loop.now - self._t0
        rep.busy_time_s += dt
        rep.step_count += k
        if rep.itl is not None:
            rep.itl.add(dt / k, self._B * k)
        self._C += self._B * k
        self._S = b
        self._t0 = rep.loop.now

    def _live(self, order: int, sid: str) -> list | None:
        entry = self._lazy.get(sid)
        return entry if entry is not None and entry[3] == order else None

    def _boundary(self, b: int) -> None:
        """Everything that happens at boundary ``b`` (the start of step b), in
        the engine's order: blocks of the steps before, the sequences whose
        last step was b - 1 finish, queued calls run, then schedule() of
        step b takes the blocks of sequences crossing a block boundary."""
        rep = self.rep
        self._catch_up(b - 1)
        fin = self._fin
        while fin and fin[0][0] <= b - 1:
            _, order, sid = heapq.heappop(fin)
            entry = self._live(order, sid)
            if entry is None:
                continue
            seq = self._materialize(entry, b)
            del self._lazy[sid]
            self._B -= 1
            self._C -= seq.num_computed_tokens + 1
            rep.sched.finish(seq, FinishReason.LENGTH)
            rep.hooks.on_finished(rep, seq)
        rep.drain_calls()
        if self._B == 0 or not self._coalescible_now():
            self._exit_fast(b)
            return
        if not self._catch_up(b):
            rep.force_step = True  # out of blocks: the production schedule() preempts
            self._exit_fast(b)
            return
        self._plan()

    def _catch_up(self, x: int) -> bool:
        """Allocate, in the engine's order (step, then position in the
        running list), the blocks sequences needed at steps <= ``x``.
        False when the pool ran out (only possible at a planned boundary)."""
        rep = self.rep
        need = self._need
        bs = rep.block_size
        while need and need[0][0] <= x:
            n, order, sid = heapq.heappop(need)
            entry = self._live(order, sid)
            if entry is None:
                continue
            seq = self._materialize(entry, n)
            if not rep.kv.allocate_more(seq, 1):
                heapq.heappush(need, (n, order, sid))
                return False
            blocks = len(rep.kv.raw_block_ids(sid))
            heapq.heappush(need, (n + blocks * bs - seq.num_computed_tokens, order, sid))
        return True

    def sync(self, now: float) -> None:
        """Bring the block pool up to ``now`` (a coalesced run allocates
        lazily); call before reading it between boundaries."""
        if not self.active:
            return
        k, at = self.steps_done(now)
        # the step in flight took its blocks when it started; at a boundary
        # not yet processed, its finishes come first
        ok = self._catch_up(self._S + k - (1 if at else 0))
        assert ok, "a coalesced run ran out of blocks inside its safe horizon"

    def _coalescible_now(self) -> bool:
        rep = self.rep
        sched = rep.sched
        if (sched.waiting or sched.parked) and len(sched.running) < sched.max_num_seqs:
            return False
        if rep.spec is not None and not rep.spec.quiet(len(sched.running)):
            return False
        return len(sched.running) <= sched.max_num_batched_tokens

    def _top(self, heap: list) -> int:
        while heap and self._live(heap[0][1], heap[0][2]) is None:
            heapq.heappop(heap)
        return heap[0][0]

    def _plan(self) -> None:
        """The next boundary to stop at: a finish, or the end of the horizon
        within which the free blocks cover every sequence's needs (each
        needs at most one block per ``block_size`` steps), or, with fewer
        free blocks than sequences, the next step that needs one."""
        rep = self.rep
        rep.epoch += 1
        free, batch, bs = rep.kv.num_free_blocks, self._B, rep.block_size
        b = self._top(self._fin) + 1
        if free >= batch:
            b = min(b, self._S + 1 + (free // batch) * bs)
        else:
            b = min(b, self._top(self._need))
        self._planned = b
        t = self._t0 + rep.step.decode_run_s(self._B, self._C, b - self._S)
        rep.loop.at(t, self._on_boundary, (rep.epoch, b))

    def _on_boundary(self, arg: tuple[int, int]) -> None:
        rep = self.rep
        epoch, b = arg
        if epoch != rep.epoch or not rep.alive or not self.active:
            return
        self._advance(b)
        self._boundary(b)

    def steps_done(self, now: float) -> tuple[int, bool]:
        """(steps of the run completed by ``now``, whether ``now`` is a boundary)."""
        rep = self.rep
        elapsed = now - self._t0
        k = rep.step.decode_steps_within(self._B, self._C, elapsed + 1e-12)
        at = abs(rep.step.decode_run_s(self._B, self._C, k) - elapsed) <= 1e-12
        return k, at

    def wake_at_next_boundary(self) -> None:
        rep = self.rep
        k, at = self.steps_done(rep.loop.now)
        b = self._S + (k if at else k + 1)
        if b >= self._planned:
            return
        self._planned = b
        t = self._t0 + rep.step.decode_run_s(self._B, self._C, b - self._S)
        rep.loop.at(t, self._on_boundary, (rep.epoch, b))

    def _exit_fast(self, b: int) -> None:
        rep = self.rep
        for entry in self._lazy.values():
            self._materialize(entry, b)
        self._lazy, self._fin, self._need = {}, [], []
        self.active = False
        rep.epoch += 1
        rep.busy = False
        rep.drain_calls()
        rep.kick()
