"""Token-budget scheduler: continuous batching with chunked prefill.

Each step gives every running sequence the tokens it is behind (one for a
decoding sequence, a chunk for a prompt) within ``max_num_batched_tokens``,
then admits waiting sequences while budget, ``max_num_seqs`` and free blocks
allow. With speculative decoding a decoding sequence may instead get its
last token plus the draft tokens proposed for it (``schedule(drafts)``),
verified in the same forward (``splitserve.engine.spec``); drafts are cut to
the budget and dropped, never a cause of preemption, when blocks are short. When a running sequence cannot grow, the most recently admitted
running sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the queue with its tokens (prompt + output so far).

Queues: waiting (FIFO) -> running -> finished. Plain Python over integers.

LoRA adapters: a sequence that names one runs only while it holds a device
slot of its adapter (``SlotGate``, the engine's ``LoraManager``): taken on
admission, given back when it finishes or is preempted. A waiting sequence
whose adapter cannot get a slot (every slot held by other adapters'
running sequences) stays queued while sequences behind it without an
adapter go ahead; no later adapter sequence is admitted past it, so the
slots it waits for drain.

Hand-off imports (``add_running``: blocks held, prompt KV computed) are
*parked* while the running batch holds ``max_num_seqs`` sequences or their
adapter has no slot: their blocks stay held and they join the batch, before
any waiting prompt is admitted, once there is room. The batch never exceeds
``max_num_seqs``; parked sequences count as waiting in the engine's load.
"""

from __future__ import annotations

import time

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens run this step, draft tokens included
    # draft tokens run after the sequence's last token, to be verified
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """This chunk reaches the sequence's last token: it yields logits."""
        return (self.seq.num_computed_tokens + self.num_new_tokens
                == self.seq.num_tokens + len(self.spec_token_ids))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class SlotGate(Protocol):
    """Device slots of LoRA adapters (``splitserve.engine.lora.manager.LoraManager``)."""

    def try_acquire(self, seq: Sequence) -> bool:
        """Give ``seq`` its adapter's slot; False when none is free now.
        True at once for a sequence without an adapter."""

    def release(self, seq: Sequence) -> None:
        """Give back ``seq``'s slot, if it holds one."""


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 slots: SlotGate | None = None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: list[Sequence] = []  # hand-off imports waiting for a batch or adapter slot
        self.num_preemptions = 0
        # called with a sequence's id when it leaves the running batch
        # (finished or preempted): the draft model drops its KV
        self.on_release: Callable[[str], None] | None = None

    # -- queue management -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks are already held (a hand-off import);
        parked, its blocks held, until the batch has room under
        ``max_num_seqs`` and its adapter gets a slot."""
        seq.status = SequenceStatus.RUNNING
        self.parked.append(seq)
        self._unpark()

    def _unpark(self) -> None:
        """Parked imports into the running batch, oldest first, while it has
        room; one whose adapter has no slot yet stays, those after it may go."""
        if not self.parked:
            return
        kept = []
        for seq in self.parked:
            if len(self.running) < self.max_num_seqs and self._acquire(seq):
                self.running.append(seq)
            else:
                kept.append(seq)
        self.parked[:] = kept

    def _acquire(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.slots is None or self.slots.try_acquire(seq)

    def _release(self, seq: Sequence) -> None:
        if self.slots is not None:
            self.slots.release(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    def finish(self, seq: Sequence, reason: FinishReason, keep_blocks: bool = False) -> None:
        """Take ``seq`` out of the queues; free its blocks unless kept for a
        hand-off (then the owner frees them later)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.parked:
            self.parked.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if not keep_blocks:
            self.kv.free(seq.seq_id)
        if self.on_release is not None:
            self.on_release(seq.seq_id)

    # -- one step ---------------------------------------------------------
    def schedule(self, drafts: Mapping[str, list[int]] | None = None) -> SchedulerOutput:
        """``drafts``: seq id -> draft tokens for decoding sequences (one
        token behind); each is cut to the budget left after its last token."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        self._unpark()  # imports waiting for a batch slot or their adapter's, before new prompts

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self.kv.chunk_tokens(seq, seq.num_computed_tokens,
                                     min(seq.num_tokens - seq.num_computed_tokens, budget))
            if n <= 0:
                i += 1
                continue
            spec = drafts.get(seq.seq_id) if drafts and n == 1 else None
            if spec and budget > 1 and self.kv.allocate_more(seq, 1 + min(len(spec), budget - 1)):
                spec = list(spec[:budget - 1])
                out.scheduled.append(ScheduledSeq(seq, 1 + len(spec), spec))
                scheduled_ids.add(seq.seq_id)
                budget -= 1 + len(spec)
                i += 1
                continue
            while not self.kv.allocate_more(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                scheduled_ids.add(seq.seq_id)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it fits either

        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting sequences into the running batch, in order, while budget,
        ``max_num_seqs`` and blocks allow (see the module docstring for
        sequences whose adapter waits for a slot)."""
        i, slot_blocked = 0, False
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if seq.adapter is not None and (slot_blocked or not self._acquire(seq)):
                slot_blocked = True
                i += 1
                continue
            n = self.kv.allocate_prompt(seq, budget)
            if n == 0:
                self._release(seq)
                break
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def preempt(self, seq: Sequence) -> None:
        """Preempt a running ``seq`` by recompute outside scheduling (its step's
        work was dropped): first in line to be admitted again."""
        self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if self.on_release is not None:
            self.on_release(seq.seq_id)

    def commit(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens now have KV (and a
        hybrid's prompt chunks a state checkpoint where they end on a block
        boundary). Draft tokens count once verified (``splitserve.engine.spec``)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens - len(s.spec_token_ids)
            self.kv.cache_full_blocks(s.seq)
            if not s.spec_token_ids:
                self.kv.commit_state(s.seq)
