"""A step's batched work, with each request's failure kept to itself.

``LLMEngine.step`` runs the model once and samples once for many
requests. ``StepGuard`` runs those two batched calls (``forward``,
``sample``) so that a request whose share raises ends alone: the batch is
narrowed to its culprits (``splitserve.engine.isolation.split_failures``),
each culprit gets a last output carrying a RequestFailedError (``fail``)
and loses its blocks, and the other requests go on. A fatal error
(``is_fatal``) propagates; when the forward fails for every request, a
one-token probe decides whether the model can run at all (else
EngineDeadError). A hybrid model's other requests are preempted by
recompute instead of run again: the failed runs advanced their recurrent
states. The speculative verifier (``spec.decoder``) samples its later rounds
and fails requests through the same guard.

The guard keeps no state of its own: it reads and updates the engine's
requests, scheduler, KV manager and failure counters
(``LLMEngine.failures_in_a_row``, ``LLMEngine.num_failed_requests``).
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import torch

from splitserve.engine.errors import EngineDeadError, RequestFailedError
from splitserve.engine.isolation import is_fatal, split_failures
from splitserve.engine.model_runner import PromptLogprobs
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.request_state import RequestState
from splitserve.engine.sampler import TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.sequence import FinishReason, Sequence

if TYPE_CHECKING:
    from splitserve.engine.llm_engine import LayerListener, LLMEngine

# ModelRunner.execute: logits [N, V], scheduled index per row, prompt logprobs
StepResult = tuple[torch.Tensor, list[int], PromptLogprobs]
log = logging.getLogger("splitserve.engine")


class StepGuard:
    def __init__(self, engine: "LLMEngine"):
        self.engine = engine

    def forward(self, scheduled: list[ScheduledSeq], layer_listener: "LayerListener | None",
                outputs: list[RequestOutput]) -> list[tuple[list[ScheduledSeq], StepResult]]:
        """The model over ``scheduled``: one run, or, when that raises, the
        parts that run once the failing sequences are found and failed."""
        eng = self.engine

        def run(part: list[ScheduledSeq]) -> StepResult:
            on_layer_done = layer_listener(part) if layer_listener else None
            return eng.runner.execute(part, eng.kv, on_layer_done)

        try:
            return [(scheduled, run(scheduled))]
        except Exception as e:  # noqa: BLE001 - narrowed down to its requests
            if is_fatal(e):
                raise
            ran, failed = split_failures(scheduled, run, e)
        suspects = [(eng.requests[s.seq.seq_id], err) for s, err in failed]
        for st, _ in suspects:  # their blocks free, for the probe
            eng.scheduler.finish(st.seq, FinishReason.ABORT)
        if not ran:
            self._probe()
        for st, err in suspects:
            outputs.append(self.fail(st, "the model forward", err))
        if ran and eng.runner.state is not None:
            # a hybrid model: the runs that raised advanced the recurrent states of the
            # layers before the failure, so the parts that ran again started from states
            # that had seen their chunk already. Their results are dropped and each of
            # them recomputes its tokens from the start (or a state checkpoint), as
            # after a preemption; KV blocks are rewritten alike.
            for part, _ in ran:
                for s in part:
                    eng.scheduler.preempt(s.seq)
            return []
        return ran

    def _probe(self) -> None:
        """Every request of a step failed the forward alone: run one token
        of a throwaway sequence. Raises EngineDeadError when the model
        cannot run at all; passes when no block is free to try."""
        eng = self.engine
        seq = Sequence(f"engine-probe-{uuid.uuid4().hex}", [0], SamplingParams(max_tokens=1),
                       eng.cfg.block_size, eng.hash_salt)
        if eng.kv.allocate_prompt(seq, 1) == 0:
            return
        try:
            eng.runner.execute([ScheduledSeq(seq, 1)], eng.kv)
        except Exception as e:
            raise EngineDeadError(f"the model failed for every request of a step and for a "
                                  f"one-token probe: {type(e).__name__}: {e}") from e
        finally:
            eng.kv.free(seq.seq_id)

    def sample(self, part: list[ScheduledSeq], logits: torch.Tensor, rows: list[int],
               prompt_lps: PromptLogprobs, outputs: list[RequestOutput]
               ) -> list[tuple[RequestState, int, TokenLogprobs | None]]:
        """Prompt logprobs and the next token of each sequence of ``part``
        that reached its last token (logits [len(rows), V]). Batched; when
        the batch raises, row by row, failing the rows that raise alone."""
        eng = self.engine
        for i, scored in prompt_lps.items():
            st = eng.requests[part[i].seq.seq_id]
            try:
                st.add_prompt_logprobs(scored)
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                outputs.append(self.fail(st, "prompt logprobs", e))
        states = [eng.requests.get(part[i].seq.seq_id) for i in rows]
        live = [k for k, st in enumerate(states) if st is not None]
        if len(live) < len(states):
            logits, states = logits[live], [states[k] for k in live]
        try:
            tokens, lps = eng.sampler(logits, [st.prepare_sampling() for st in states])
            return list(zip(states, tokens, lps))
        except Exception as e:  # noqa: BLE001 - narrowed down to its rows
            if is_fatal(e):
                raise
        sampled = []
        for k, st in enumerate(states):
            try:
                tok, lp = eng.sampler(logits[k:k + 1], [st.prepare_sampling()])
            except Exception as e:  # noqa: BLE001
                if is_fatal(e):
                    raise
                outputs.append(self.fail(st, "sampling", e))
            else:
                sampled.append((st, tok[0], lp[0]))
        return sampled

    def fail(self, st: RequestState, stage: str, exc: Exception) -> RequestOutput:
        """End one request whose processing raised: free its blocks and
        return its last output, which carries the error."""
        eng = self.engine
        seq, rid = st.seq, st.seq.seq_id
        log.warning("request %s failed in %s; ending it alone", rid, stage, exc_info=exc)
        eng.scheduler.finish(seq, FinishReason.ABORT)  # idempotent
        eng.requests.pop(rid, None)
        eng._prefill_only.discard(rid)
        eng.failures_in_a_row += 1
        eng.num_failed_requests += 1
        detail = f"{type(exc).__name__}: {exc}"[:300]
        # not chained to ``exc``: its traceback holds the step's frames and tensors
        err = RequestFailedError(f"request {rid!r} failed in {stage} ({detail}); the engine and "
                                 "its other requests go on", request_id=rid)
        return RequestOutput(request_id=rid, new_token_ids=[], new_text="", finished=True,
                             finish_reason=None, num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=seq.num_output_tokens,
                             num_cached_tokens=seq.num_cached_tokens, error=err)
