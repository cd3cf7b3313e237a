"""One simulated replica: the engine's own Scheduler and KV block manager,
with a step-time model where the model would run.

Like ``AsyncEngine``, the replica owns its engine state on one "thread":
calls from outside (add a request, reserve or commit a hand-off, release
blocks) run at once when it is idle, else queue until the step in flight
ends (``call``). Each step is ``Scheduler.schedule()``, a duration from the
``StepTimeModel`` for the step's mix, then ``Scheduler.commit()`` and the
token bookkeeping ``LLMEngine.step`` does (finish at the output length,
keep the blocks of a finished prefill-only sequence for its hand-off).

Coalesced decode: while every running sequence is decoding and nothing can
be admitted (no waiting sequence, or ``max_num_seqs`` running), each step
is fully determined: every sequence gains one token and a block when it
crosses a block boundary. The replica then skips the per-step calls and
jumps from boundary to boundary where something happens: a sequence
finishes, a sequence needs a block (allocated through the KV manager at
that step, so the pool is exact at every event), or a call arrives. A
sequence's counts are brought up to date ("materialized") only at those
boundaries; step durations over a run come from the model's closed form.
When a block allocation fails, the run ends and the production
``schedule()`` runs that step (and preempts). ``tests/unit/
test_planning_replica.py`` checks that coalesced and step-by-step runs give
identical token times.
"""

from __future__ import annotations

import heapq
from typing import Callable, Protocol

from splitserve.cluster.planning.records import chunk_attn
from splitserve.cluster.planning.sim.events import EventLoop
from splitserve.cluster.planning.sim.sequence import SimSequence
from splitserve.cluster.planning.step_model import StepTimeModel
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import FinishReason


class ReplicaHooks(Protocol):
    """What the request layer hears from a replica (all at the event's time)."""

    def on_first_token(self, rep: "SimReplica", seq: SimSequence) -> None: ...

    def on_finished(self, rep: "SimReplica", seq: SimSequence) -> None: ...

    def on_prefill_done(self, rep: "SimReplica", seq: SimSequence) -> None: ...


class TokenTimes(Protocol):
    def add(self, seconds: float, count: int) -> None: ...


class SimReplica:
    def __init__(self, loop: EventLoop, replica_id: str, role: str, model: str, node_id: str,
                 step: StepTimeModel, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, hooks: ReplicaHooks,
                 itl: TokenTimes | None = None, coalesce: bool = True):
        self.loop = loop
        self.replica_id = replica_id
        self.role = role  # prefill | decode | colocated
        self.model = model
        self.node_id = node_id
        self.step = step
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=True)
        self.sched = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        self.hooks = hooks
        self.itl = itl
        self.coalesce = coalesce
        self.alive = True
        self.draining = False
        # what LLMEngine and the workers count
        self.busy_time_s = 0.0
        self.step_count = 0
        self.prompt_tokens_computed = 0
        self.bytes_sent = 0  # prefill: KV sent
        self.handoff_bytes = 0  # decode: KV received
        self.handoffs = 0
        self.reservations = 0  # open hand-off reservations (decode)
        self.inflight = 0  # outgoing hand-offs (prefill)
        self.busy = False
        self.calls: list[Callable[[], None]] = []
        self._in_drain = False  # running queued calls: new ones queue behind them
        self._force_step = False  # the next step runs schedule() (a block ran out)
        self._epoch = 0
        # the regular step in flight
        self._out = None
        self._completing: list[SimSequence] = []
        self._step_t0 = 0.0
        self._step_dt = 0.0
        self._step_decodes = 0
        # the coalesced run
        self._fast = False
        self._S = 0  # step index at the run's last boundary (= step_count there)
        self._t0 = 0.0  # its time
        self._B = 0  # sequences in the batch
        self._C = 0  # sum of their attention lengths at step _S
        self._lazy: dict[str, list] = {}  # seq_id -> [seq, s0, c0, order]
        self._fin: list[tuple[int, int, str]] = []  # (last step, order, seq_id)
        self._need: list[tuple[int, int, str]] = []  # (step needing a block, order, seq_id)
        self._order = 0
        self._planned = -1  # boundary of the next planned event

    # -- the engine thread ---------------------------------------------------------
    def call(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the engine between steps; False if the replica is dead."""
        if not self.alive:
            return False
        if self.busy or self._in_drain:
            self.calls.append(fn)
            if self._fast and not self._in_drain:
                self._wake_at_next_boundary()
        else:
            fn()
            self.kick()
        return True

    def add_running(self, seq: SimSequence) -> None:
        """``Scheduler.add_running`` (a committed hand-off), aware of a
        coalesced run: the sequences it moved into the batch join the run
        (it parks them while ``max_num_seqs`` are running)."""
        running = self.sched.running
        before = len(running)
        self.sched.add_running(seq)
        if self._fast:
            for joined in running[before:]:
                self._register(joined)
                self._B += 1
                self._C += joined.num_computed_tokens + 1

    def admit_imported(self, seq: SimSequence, computed: int) -> None:
        """Admit a sequence whose ``computed`` prompt tokens' KV arrived by
        hand-off, with the first token the prefill replica sampled: it
        finishes if that was its last token, else it runs."""
        seq.num_computed_tokens = computed
        seq.append_token(0)
        self.kv.cache_full_blocks(seq)
        self.hooks.on_first_token(self, seq)
        if seq.done:
            self.sched.finish(seq, FinishReason.LENGTH)
            self.hooks.on_finished(self, seq)
        else:
            self.add_running(seq)

    def kick(self) -> None:
        """Start the next step if idle and there is work."""
        if self.busy or not self.alive or self._in_drain:
            return
        if self._force_step:
            self._force_step = False
        elif self.coalesce and self._coalescible():
            self._enter_fast()
            return
        out = self.sched.schedule()
        if out.is_empty:
            return
        p_tok = p_big = b = c = 0
        p_attn = 0.0
        completing = []
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            done = seq.num_computed_tokens
            if n == 1 and done == seq.num_tokens - 1 and done >= seq.num_prompt_tokens:
                b += 1
                c += done + 1
            else:
                p_tok += n
                p_attn += chunk_attn(n, done)
            if n > 1:
                p_big += n
            if s.completes:
                completing.append(seq)
        dt = self.step.step_s(p_tok, p_attn, b, c)
        self.busy = True
        self._out = out
        self._completing = completing
        self._step_t0 = self.loop.now
        self._step_dt = dt
        self._step_decodes = b
        self._step_prompt = p_big
        self.loop.at(self.loop.now + dt, self._end_step, self._epoch)

    def _end_step(self, epoch: int) -> None:
        if epoch != self._epoch or not self.alive:
            return
        out, completing = self._out, self._completing
        self._out, self._completing = None, []
        self.sched.commit(out)
        self.step_count += 1
        self.busy_time_s += self._step_dt
        self.prompt_tokens_computed += self._step_prompt
        if self.itl is not None and self._step_decodes:
            self.itl.add(self._step_dt, self._step_decodes)
        for seq in completing:
            if seq.prefill_only:
                self.sched.finish(seq, FinishReason.HANDOFF, keep_blocks=True)
                self.hooks.on_prefill_done(self, seq)
                continue
            seq.append_token(0)
            if seq.num_output_tokens == 1:
                self.hooks.on_first_token(self, seq)
            if seq.done:
                self.sched.finish(seq, FinishReason.LENGTH)
                self.hooks.on_finished(self, seq)
        self.busy = False
        self._drain_calls()
        self.kick()

    def _drain_calls(self) -> None:
        self._in_drain = True
        try:
            while self.calls:
                calls, self.calls = self.calls, []
                for fn in calls:
                    fn()
        finally:
            self._in_drain = False

    # -- coalesced decode -------------------------------------------------------------
    def _coalescible(self) -> bool:
        sched = self.sched
        running = sched.running
        if not running or self.calls:
            return False
        if (sched.waiting or sched.parked) and len(running) < sched.max_num_seqs:
            return False  # the next schedule() may admit
        if len(running) > sched.max_num_batched_tokens:
            return False  # not every sequence steps each time
        for seq in running:
            done = seq.num_computed_tokens
            if seq.num_tokens - done != 1 or done < seq.num_prompt_tokens or seq.prefill_only:
                return False
        return True

    def _register(self, seq: SimSequence) -> None:
        order = self._order
        self._order += 1
        s0, c0 = self._S, seq.num_computed_tokens
        self._lazy[seq.seq_id] = [seq, s0, c0, order]
        heapq.heappush(self._fin, (s0 + seq.target_output - seq.num_output_tokens - 1, order,
                                   seq.seq_id))
        blocks = len(self.kv.raw_block_ids(seq.seq_id))
        heapq.heappush(self._need, (s0 + max(0, blocks * self.block_size - c0), order, seq.seq_id))

    def _enter_fast(self) -> None:
        self._fast = True
        self.busy = True
        self._S = self.step_count
        self._t0 = self.loop.now
        self._lazy, self._fin, self._need = {}, [], []
        running = self.sched.running
        self._B = len(running)
        self._C = sum(seq.num_computed_tokens + 1 for seq in running)
        for seq in running:
            self._register(seq)
        self._boundary(self._S)

    def _materialize(self, entry: list, b: int) -> SimSequence:
        seq, s0, c0, _ = entry
        k = b - s0
        if k > 0:
            seq.token_ids.extend([0] * k)
            seq.num_computed_tokens = c0 + k
            entry[1], entry[2] = b, c0 + k
            self.kv.cache_full_blocks(seq)
        return seq

    def _advance(self, b: int) -> None:
        k = b - self._S
        if k <= 0:
            return
        dt = self.loop.now - self._t0
        self.busy_time_s += dt
        self.step_count += k
        if self.itl is not None:
            self.itl.add(dt / k, self._B * k)
        self._C += self._B * k
        self._S = b
        self._t0 = self.loop.now

    def _live(self, order: int, sid: str) -> list | None:
        entry = self._lazy.get(sid)
        return entry if entry is not None and entry[3] == order else None

    def _boundary(self, b: int) -> None:
        """Everything that happens at boundary ``b`` (the start of step b), in
        the engine's order: blocks of the steps before, the sequences whose
        last step was b - 1 finish, queued calls run, then schedule() of
        step b takes the blocks of sequences crossing a block boundary."""
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
            self.sched.finish(seq, FinishReason.LENGTH)
            self.hooks.on_finished(self, seq)
        self._drain_calls()
        if self._B == 0 or not self._coalescible_now():
            self._exit_fast(b)
            return
        if not self._catch_up(b):
            self._force_step = True  # out of blocks: the production schedule() preempts
            self._exit_fast(b)
            return
        self._plan()

    def _catch_up(self, x: int) -> bool:
        """Allocate, in the engine's order (step, then position in the
        running list), the blocks sequences needed at steps <= ``x``.
        False when the pool ran out (only possible at a planned boundary)."""
        need = self._need
        bs = self.block_size
        while need and need[0][0] <= x:
            n, order, sid = heapq.heappop(need)
            entry = self._live(order, sid)
            if entry is None:
                continue
            seq = self._materialize(entry, n)
            if not self.kv.allocate_more(seq, 1):
                heapq.heappush(need, (n, order, sid))
                return False
            blocks = len(self.kv.raw_block_ids(sid))
            heapq.heappush(need, (n + blocks * bs - seq.num_computed_tokens, order, sid))
        return True

    def sync(self, now: float) -> None:
        """Bring the block pool up to ``now`` (a coalesced run allocates
        lazily); call before reading it between boundaries."""
        if not self._fast:
            return
        k, at = self._steps_done(now)
        # the step in flight took its blocks when it started; at a boundary
        # not yet processed, its finishes come first
        ok = self._catch_up(self._S + k - (1 if at else 0))
        assert ok, "a coalesced run ran out of blocks inside its safe horizon"

    def _coalescible_now(self) -> bool:
        sched = self.sched
        if (sched.waiting or sched.parked) and len(sched.running) < sched.max_num_seqs:
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
        self._epoch += 1
        free, batch, bs = self.kv.num_free_blocks, self._B, self.block_size
        b = self._top(self._fin) + 1
        if free >= batch:
            b = min(b, self._S + 1 + (free // batch) * bs)
        else:
            b = min(b, self._top(self._need))
        self._planned = b
        t = self._t0 + self.step.decode_run_s(self._B, self._C, b - self._S)
        self.loop.at(t, self._on_boundary, (self._epoch, b))

    def _on_boundary(self, arg: tuple[int, int]) -> None:
        epoch, b = arg
        if epoch != self._epoch or not self.alive or not self._fast:
            return
        self._advance(b)
        self._boundary(b)

    def _steps_done(self, now: float) -> tuple[int, bool]:
        """(steps of the run completed by ``now``, whether ``now`` is a boundary)."""
        elapsed = now - self._t0
        k = self.step.decode_steps_within(self._B, self._C, elapsed + 1e-12)
        at = abs(self.step.decode_run_s(self._B, self._C, k) - elapsed) <= 1e-12
        return k, at

    def _wake_at_next_boundary(self) -> None:
        k, at = self._steps_done(self.loop.now)
        b = self._S + (k if at else k + 1)
        if b >= self._planned:
            return
        self._planned = b
        t = self._t0 + self.step.decode_run_s(self._B, self._C, b - self._S)
        self.loop.at(t, self._on_boundary, (self._epoch, b))

    def _exit_fast(self, b: int) -> None:
        for entry in self._lazy.values():
            self._materialize(entry, b)
        self._lazy, self._fin, self._need = {}, [], []
        self._fast = False
        self._epoch += 1
        self.busy = False
        self._drain_calls()
        self.kick()

    # -- what the worker reports ------------------------------------------------------
    def busy_time_at(self, now: float) -> float:
        if self._fast:
            return self.busy_time_s + (now - self._t0)
        if self._out is not None:
            return self.busy_time_s + (now - self._step_t0)
        return self.busy_time_s

    def steps_at(self, now: float) -> int:
        if self._fast:
            return self.step_count + self._steps_done(now)[0]
        return self.step_count

    def produced_at(self, seq: SimSequence, now: float) -> int:
        """Output tokens ``seq`` has produced by ``now`` (its lazy count in a run)."""
        entry = self._lazy.get(seq.seq_id) if self._fast else None
        if entry is None:
            return seq.num_output_tokens
        k, _ = self._steps_done(now)
        return seq.num_output_tokens + max(0, self._S + k - entry[1])

    def pending_prompt_tokens(self) -> int:
        """``LLMEngine.pending_prompt_tokens``: prompt tokens not yet computed
        (the sequences of a coalesced run have none; those queued behind a
        full batch do)."""
        sched = self.sched
        seqs = list(sched.waiting) + sched.parked
        if not self._fast:
            seqs += sched.running
        return sum(max(0, s.num_tokens - s.num_computed_tokens - 1) for s in seqs)

    # -- failure ---------------------------------------------------------------------------
    def kill(self) -> list[SimSequence]:
        """The replica dies now; returns the sequences it held."""
        seqs = list(self.sched.waiting) + list(self.sched.running) + list(self.sched.parked)
        self.alive = False
        self._epoch += 1
        self.calls = []
        return seqs
