"""One simulated replica: the engine's own Scheduler and KV block manager,
with a step-time model where the model would run.

Like ``AsyncEngine``, the replica owns its engine state on one "thread":
calls from outside (add a request, reserve or commit a hand-off, release
blocks) run at once when it is idle, else queue until the step in flight
ends (``call``). Each step is ``Scheduler.schedule()``, a duration from the
``StepTimeModel`` for the step's mix, then ``Scheduler.commit()`` and the
token bookkeeping ``LLMEngine.step`` does (finish at the output length,
keep the blocks of a finished prefill-only sequence for its hand-off).

Coalesced decode (``CoalescedRun``, ``sim.coalesced``): while every
running sequence is decoding and nothing can be admitted, the replica jumps
over whole runs of decode steps to the boundaries where something happens.

Speculative decoding (``spec``, a ``SimSpeculator``): each step's drafts
come from the engine's length rule; a verify step's draft tokens are timed
as query tokens after each sequence's context, the accepted drafts are
drawn, and the KV of rejected ones is trimmed as the engine does. A
coalesced run is entered only at batch sizes where the rule cannot
speculate, so its steps are plain decode steps.
"""

from __future__ import annotations

from typing import Callable, Protocol

from splitserve.cluster.planning.records import chunk_attn
from splitserve.cluster.planning.sim.coalesced import CoalescedRun
from splitserve.cluster.planning.sim.events import EventLoop
from splitserve.cluster.planning.sim.sequence import SimSequence
from splitserve.cluster.planning.sim.speculation import SimSpeculator
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
                 itl: TokenTimes | None = None, coalesce: bool = True,
                 spec: SimSpeculator | None = None):
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
        self.spec = spec
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
        self.force_step = False  # the next step runs schedule() (a block ran out)
        self.epoch = 0  # events of an older step or run are stale
        # the regular step in flight
        self._out = None
        self._completing: list[SimSequence] = []
        self._step_t0 = 0.0
        self._step_dt = 0.0
        self._step_decodes = 0
        self._step_verify_s = 0.0
        self._step_draft_s = 0.0
        self._spec_ids: dict[str, int] = {}  # the step's verify runs: seq id -> drafts
        self._proposed = self._accepted = self._rejected = 0
        self.run = CoalescedRun(self)

    # -- the engine thread ---------------------------------------------------------
    def call(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the engine between steps; False if the replica is dead."""
        if not self.alive:
            return False
        if self.busy or self._in_drain:
            self.calls.append(fn)
            if self.run.active and not self._in_drain:
                self.run.wake_at_next_boundary()
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
        if self.run.active:
            for joined in running[before:]:
                self.run.join(joined)

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
        if self.force_step:
            self.force_step = False
        elif self.coalesce and self.run.possible():
            self.run.enter()
            return
        spec = self.spec
        out = self.sched.schedule(spec.drafts(self.sched.running) if spec is not None else None)
        if out.is_empty:
            return
        p_tok = p_big = b = c = 0
        p_attn = 0.0
        completing = []
        drafted = 0  # most draft tokens of one sequence (the draft model's steps)
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            done = seq.num_computed_tokens
            k = len(s.spec_token_ids)
            if k:  # a verify run: its last token, then k drafts as query tokens
                b += 1
                c += done + 1
                p_tok += k
                p_attn += chunk_attn(k, done + 1)
                drafted = max(drafted, k)
                if s.completes:
                    completing.append(seq)
                continue
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
        self._step_verify_s, self._step_draft_s = dt, 0.0
        if drafted and spec.draft_cost_ratio > 0:
            # the draft model decodes each position for the drafted sequences
            self._step_draft_s = spec.draft_position_s(self.step.step_s(0, 0, b, c))
            dt += drafted * self._step_draft_s
        self.busy = True
        self._out = out
        self._completing = completing
        self._step_t0 = self.loop.now
        self._step_dt = dt
        self._step_decodes = b
        self._step_prompt = p_big
        self.loop.at(self.loop.now + dt, self._end_step, self.epoch)

    def _end_step(self, epoch: int) -> None:
        if epoch != self.epoch or not self.alive:
            return
        out, completing = self._out, self._completing
        self._out, self._completing = None, []
        self._spec_ids = {} if self.spec is None else {
            s.seq.seq_id: len(s.spec_token_ids) for s in out.scheduled if s.spec_token_ids}
        self._proposed, self._accepted, self._rejected = sum(self._spec_ids.values()), 0, 0
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
            if not seq.done and self._spec_ids.get(seq.seq_id):
                got, cut = self.spec.accept(seq, self._spec_ids[seq.seq_id], self.kv)
                self._accepted += got
                self._rejected += cut
            if seq.done:
                self.sched.finish(seq, FinishReason.LENGTH)
                self.hooks.on_finished(self, seq)
        if self._spec_ids:
            self.spec.observe(len(self._spec_ids), self._proposed, self._accepted,
                              self._step_draft_s, self._step_verify_s, self._rejected)
        self.busy = False
        self.drain_calls()
        self.kick()

    def drain_calls(self) -> None:
        """Run the queued calls (``call``), and those they queue."""
        self._in_drain = True
        try:
            while self.calls:
                calls, self.calls = self.calls, []
                for fn in calls:
                    fn()
        finally:
            self._in_drain = False

    def sync(self, now: float) -> None:
        """Bring the block pool up to ``now`` (a coalesced run allocates
        lazily); call before reading it between boundaries."""
        self.run.sync(now)

    # -- what the worker reports ------------------------------------------------------
    def busy_time_at(self, now: float) -> float:
        if self.run.active:
            return self.busy_time_s + self.run.busy_s(now)
        if self._out is not None:
            return self.busy_time_s + (now - self._step_t0)
        return self.busy_time_s

    def steps_at(self, now: float) -> int:
        if self.run.active:
            return self.step_count + self.run.steps_at(now)
        return self.step_count

    def produced_at(self, seq: SimSequence, now: float) -> int:
        """Output tokens ``seq`` has produced by ``now`` (its lazy count in a run)."""
        more = self.run.produced_since(seq, now) if self.run.active else None
        if more is None:
            return seq.num_output_tokens
        return seq.num_output_tokens + more

    def pending_prompt_tokens(self) -> int:
        """``LLMEngine.pending_prompt_tokens``: prompt tokens not yet computed
        (the sequences of a coalesced run have none; those queued behind a
        full batch do)."""
        sched = self.sched
        seqs = list(sched.waiting) + sched.parked
        if not self.run.active:
            seqs += sched.running
        return sum(max(0, s.num_tokens - s.num_computed_tokens - 1) for s in seqs)

    # -- failure ---------------------------------------------------------------------------
    def kill(self) -> list[SimSequence]:
        """The replica dies now; returns the sequences it held."""
        seqs = list(self.sched.waiting) + list(self.sched.running) + list(self.sched.parked)
        self.alive = False
        self.epoch += 1
        self.calls = []
        return seqs
