"""Speculative decoding in the engine loop: propose, schedule, verify.

``LLMEngine.step`` calls three hooks when ``EngineConfig.speculative`` is
set (``LLMEngine.spec``):

  propose(engine)          before ``Scheduler.schedule``: the speculation
                           length for this batch (``spec.adaptive``), and
                           the proposer's drafts for each decoding sequence
                           that allows it, cut to its max_tokens, the
                           context, and what its grammar accepts.
  begin_verify(...)        after the forward: a sequence with k drafts has
                           k + 1 logit rows; the first goes through the
                           engine's ordinary sampling with ``draft_token``
                           set (its sampled token is the verdict on the
                           first draft), the rest wait here.
  finish_verify(...)       after the first tokens are taken: round j
                           samples row j of every sequence whose drafts
                           0..j-1 were all accepted, and takes its token
                           (stop checks, grammar, logprobs as always), so
                           penalties, min_tokens and the grammar see exactly
                           the tokens before it. A token that differs from
                           the draft, a finished sequence or the last row
                           ends the run. Then each sequence's KV is rolled
                           back to its accepted tokens (``KVCacheManager.trim``
                           frees blocks held only for rejected drafts; only
                           full blocks of accepted tokens are hashed into the
                           prefix cache; a hybrid model's recurrent states go
                           back to those after the accepted drafts,
                           ``RecurrentState.rollback``) and its outputs of the
                           step merge into one.

The verdict per row: greedy rows take the argmax; seeded rows their seeded
draw, which for these point-mass drafts is exact rejection sampling (see
``splitserve.engine.spec.rejection``) and keeps the output identical to
non-speculative output; unseeded sampled rows accept by rejection sampling.
A draft is accepted iff the row's token equals it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from splitserve.engine.isolation import is_fatal
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.adaptive import LengthRule, step_curve
from splitserve.engine.spec.config import SpeculativeConfig
from splitserve.engine.spec.proposer import Proposer, ProposerContext, make_proposer

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LLMEngine

@dataclass
class SpecCounters:
    """Cumulative since the engine started (``EngineLoad`` reports them)."""

    drafts: int = 0  # sequences verified with at least one draft token
    draft_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # of those, accepted
    draft_time_s: float = 0.0  # time spent proposing
    # accepted tokens by draft position (vLLM's num_accepted_tokens_per_pos)
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verified sequence and step: 1 + accepted drafts."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 0.0


@dataclass
class _Run:
    """One sequence's verification in this step."""

    sched: ScheduledSeq
    st: object  # RequestState
    rows: torch.Tensor  # [k, V] logits of the rows after the first
    accepted: int = 0


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, ctx: ProposerContext,
                 proposer: Proposer | None = None):
        self.cfg = cfg
        self.proposer = proposer or make_proposer(cfg, ctx)
        self.curve = step_curve(cfg.saturation_tokens, ctx.device.type)
        self.rule = LengthRule(cfg.num_speculative_tokens, self.curve,
                               cfg.adaptive, cfg.disable_batch_size,
                               per_position=self.proposer.cost_per_position)
        self.tracker = self.rule.tracker
        self.counters = SpecCounters(accepted_per_pos=[0] * cfg.num_speculative_tokens)
        self.last_k = 0  # the speculation length of the last step
        self._runs: dict[str, _Run] = {}
        self._drafts: dict[str, list[int]] = {}
        self._draft_s = 0.0
        self._draft_steps = 0
        self._t_step = 0.0

    def release(self, seq_id: str) -> None:
        """``Scheduler.on_release``."""
        self.proposer.release(seq_id)

    def all_free(self) -> bool:
        return self.proposer.all_free()

    # -- before scheduling -----------------------------------------------------
    def propose(self, engine: "LLMEngine") -> dict[str, list[int]]:
        """Draft tokens per sequence id for ``Scheduler.schedule``."""
        self._t_step = time.perf_counter()
        self._drafts = {}
        running = engine.scheduler.running
        cands: list[Sequence] = [
            s for s in running
            if s.num_tokens - s.num_computed_tokens == 1 and s.seq_id not in engine._prefill_only
            and s.params.speculative]
        k = self.rule.length(len(running), bool(cands))
        self.last_k = k
        seqs, ks = [], []
        for s in cands:
            n = min(k, engine.max_model_len - s.num_tokens - 1)
            if s.params.max_tokens is not None:
                n = min(n, s.params.max_tokens - s.num_output_tokens - 1)
            if n > 0:
                seqs.append(s)
                ks.append(n)
        self._draft_s, self._draft_steps = 0.0, 0
        if not seqs:
            return self._drafts
        t0 = time.perf_counter()
        proposals = self.proposer.propose(seqs, ks)
        self._draft_s = time.perf_counter() - t0
        # a draft model drafts one position per forward; a lookup all at once
        self._draft_steps = max(ks) if self.proposer.cost_per_position else 1
        self.counters.draft_time_s += self._draft_s
        for s, n, d in zip(seqs, ks, proposals):
            d = list(d[:n])
            st = engine.requests.get(s.seq_id)
            if d and st is not None and st.matcher is not None:
                d = d[:st.matcher.valid_prefix(d)]  # the grammar would refuse the rest
            if d:
                self._drafts[s.seq_id] = d
        return self._drafts

    # -- after the forward -------------------------------------------------------
    def begin_verify(self, engine: "LLMEngine", part: list[ScheduledSeq], logits: torch.Tensor,
                     rows: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Keep the first logit row of each sequence for the ordinary
        sampling (with its first draft as ``draft_token``); hold the rest."""
        if not any(s.spec_token_ids for s in part):
            return logits, rows
        keep: list[int] = []
        r = 0
        while r < len(rows):
            i = rows[r]
            sched = part[i]
            k = len(sched.spec_token_ids)
            keep.append(r)
            st = engine.requests.get(sched.seq.seq_id)
            if k and st is not None:
                st.sampling.draft_token = sched.spec_token_ids[0]
                self._runs[sched.seq.seq_id] = _Run(sched, st, logits[r + 1:r + 1 + k])
            r += 1 + k
        return logits[keep], [rows[r] for r in keep]

    def finish_verify(self, engine: "LLMEngine", outputs: list[RequestOutput],
                      now: float) -> list[RequestOutput]:
        """Rounds 1..k over the held rows, KV rollback, counters; returns
        ``outputs`` with each request's outputs of this step merged."""
        if not self._runs:
            return outputs
        runs, self._runs = list(self._runs.values()), {}
        active = [r for r in runs if self._accepted(r, 0)]
        j = 0
        while active:
            j += 1
            for r in active:
                r.accepted += 1
                r.sched.seq.num_computed_tokens += 1  # the accepted draft's KV stands
                drafts = r.sched.spec_token_ids
                r.st.sampling.draft_token = drafts[j] if j < len(drafts) else None
            part = [r.sched for r in active]
            logits = torch.stack([r.rows[j - 1] for r in active])
            sampled = engine.guard.sample(part, logits, list(range(len(part))), {}, outputs)
            for st, tok, lp in sampled:
                if st.seq.is_finished:
                    continue
                try:
                    outputs.append(engine._take_token(st, tok, lp, now))
                except Exception as e:  # noqa: BLE001 - this request's fault alone
                    if is_fatal(e):
                        raise
                    outputs.append(engine.guard.fail(st, "output processing", e))
            active = [r for r in active if j < len(r.sched.spec_token_ids) and self._accepted(r, j)]
        c = self.counters
        for r in runs:
            r.st.sampling.draft_token = None
            seq, k = r.sched.seq, len(r.sched.spec_token_ids)
            c.drafts += 1
            c.draft_tokens += k
            c.accepted_tokens += r.accepted
            for pos in range(r.accepted):
                c.accepted_per_pos[pos] += 1
            if not seq.is_finished and engine.kv.has_owner(seq.seq_id):
                engine.kv.trim(seq.seq_id, seq.num_tokens)
                engine.kv.cache_full_blocks(seq)
                if engine.runner.state is not None:  # a hybrid's states after the accepted drafts
                    engine.runner.rollback_state(engine.kv.state_slot(seq.seq_id), 1 + r.accepted)
        proposed = sum(len(r.sched.spec_token_ids) for r in runs)
        rejected = sum(1 for r in runs if r.accepted < len(r.sched.spec_token_ids)
                       and not r.sched.seq.is_finished)
        step_s = time.perf_counter() - self._t_step - self._draft_s
        self.tracker.observe(proposed, sum(r.accepted for r in runs), self._per_position_s(),
                             step_s, rejected)
        return merge_outputs(outputs)

    def _per_position_s(self) -> float | None:
        """This step's drafting time per draft position (per step where
        ``Proposer.cost_per_position`` is False), without the
        proposer's one-off work (a draft prefilling a prompt is no cost of
        each later draft token); None when nothing else was timed."""
        steps = self._draft_steps
        one_off = self.proposer.one_off_s
        if one_off > 0:
            steps -= 1  # the forward that prefilled also drafted position 0
        if steps <= 0:
            return None
        return max(0.0, self._draft_s - one_off) / steps

    @staticmethod
    def _accepted(r: _Run, j: int) -> bool:
        """Whether round j's token (now the sequence's last) is draft j."""
        seq = r.sched.seq
        return not seq.is_finished and seq.token_ids[-1] == r.sched.spec_token_ids[j]


def merge_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request and step: the tokens, text and logprobs of
    its consecutive outputs joined, the last one's state. An output that
    carries an error stays apart."""
    merged: list[RequestOutput] = []
    last: dict[str, RequestOutput] = {}
    for o in outputs:
        prev = last.get(o.request_id)
        if prev is None or prev.finished or o.error is not None or prev.error is not None:
            o = RequestOutput(**{**o.__dict__, "new_token_ids": list(o.new_token_ids),
                                 "new_logprobs": list(o.new_logprobs) if o.new_logprobs else None})
            merged.append(o)
            last[o.request_id] = o
            continue
        prev.new_token_ids += o.new_token_ids
        prev.new_text += o.new_text
        if o.new_logprobs:
            prev.new_logprobs = (prev.new_logprobs or []) + o.new_logprobs
        prev.finished, prev.finish_reason = o.finished, o.finish_reason
        prev.num_output_tokens = o.num_output_tokens
        prev.num_cached_tokens = o.num_cached_tokens
        if prev.prompt_logprobs is None:
            prev.prompt_logprobs = o.prompt_logprobs
    return merged
