"""Per-request output processing: stop conditions, detokenization, streaming.

Kept apart from the engine loop so the same logic runs wherever a
sequence's tokens are produced (a colocated engine, or the decode side of
a hand-off, which also processes the first token sampled by prefill).
"""

from __future__ import annotations

from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampler import SeqSamplingState, TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import FinishReason, Sequence
from splitserve.engine.stop import StopChecker
from splitserve.engine.structured import PARAM, GrammarCompiler, GrammarMatcher
from splitserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestState:
    def __init__(self, seq: Sequence, params: SamplingParams, tokenizer: Tokenizer | None,
                 eos_token_ids: tuple[int, ...], max_model_len: int,
                 grammar: GrammarCompiler | None = None, matcher: GrammarMatcher | None = None):
        self.seq = seq
        self.params = params
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        # a resumed request's earlier output ends its prompt (SamplingParams.resumed_tokens)
        split = seq.num_prompt_tokens - params.resumed_tokens
        prompt = seq.prompt_token_ids
        self.sampling = SeqSamplingState.create(params, prompt[:split], tuple(eos_token_ids))
        self.sampling.output_ids = list(prompt[split:])  # grows by each token this state takes
        self.sampling.num_prior = params.resumed_tokens
        # a matcher built beforehand (LLMEngine.build_matcher, off the engine
        # thread) has consumed the same earlier output
        self.matcher = matcher
        if matcher is None and params.structured_output is not None:
            if grammar is None:
                raise InvalidRequestError("this engine cannot constrain outputs", param=PARAM)
            self.matcher = grammar.matcher(params.structured_output, prompt[split:])
        self.sampling.matcher = self.matcher
        self.stop_ids = set(params.stop_token_ids or ())
        self.max_model_len = max_model_len
        self.detok = (
            IncrementalDetokenizer(tokenizer, prompt[:split], params.skip_special_tokens)
            if tokenizer is not None else None
        )
        self.stop = StopChecker(list(params.stop or ()), params.include_stop_str_in_output)
        self.text = ""  # released so far, earlier output included
        self.logprobs: list[TokenLogprobs] = []
        # [None, logprobs of prompt token 1, ...] as the prompt's chunks are scored
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        if self.detok is not None:
            self._replay(prompt[split:])

    def _replay(self, earlier: list[int]) -> None:
        """Run the earlier output through the detokenizer and stop checker
        without emitting it: the caller has its text already, except what
        was held back (an unfinished character, a possible stop string's
        start), which stays held here and is released, or completes a stop
        string, with the next tokens, as on the replica that produced it."""
        for token_id in earlier:
            released, _ = self.stop.check(self.text, self.detok.step([token_id]))
            self.text += released

    def add_prompt_logprobs(self, scored: list[tuple[int, TokenLogprobs]]) -> None:
        """Record prompt position p's score of token p + 1, in order; a
        chunk computed again (after preemption) adds nothing twice."""
        if self.prompt_logprobs is None:
            return
        for p, lp in scored:
            if p + 1 == len(self.prompt_logprobs):
                self.prompt_logprobs.append(lp)

    def _first_output_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        # delivered once, with the first token
        return self.prompt_logprobs if self.seq.num_output_tokens == 1 else None

    def prepare_sampling(self) -> SeqSamplingState:
        """The sampler reseeds seeded rows from (seed, output position), so a
        sequence samples the same tokens wherever each step runs (prefill on
        one replica, decode on another, after preemption or a resume)."""
        return self.sampling

    def record_handoff_token(self, token_id: int, logprobs: TokenLogprobs | None) -> RequestOutput:
        """A prefill-only request's first token: appended, not processed."""
        self.seq.append_token(token_id)
        self.sampling.output_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        return RequestOutput(
            request_id=self.seq.seq_id, new_token_ids=[token_id], new_text="", finished=True,
            finish_reason="handoff", num_prompt_tokens=self.seq.num_prompt_tokens,
            num_output_tokens=1, num_cached_tokens=self.seq.num_cached_tokens,
            new_logprobs=[logprobs] if logprobs is not None else None,
            prompt_logprobs=self._first_output_prompt_logprobs(),
        )

    def on_token(self, token_id: int, logprobs: TokenLogprobs | None) -> tuple[RequestOutput, FinishReason | None]:
        """Append one sampled token; return the delta to stream and whether
        the request finished (and why)."""
        seq = self.seq
        seq.append_token(token_id)
        self.sampling.output_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        n_out = seq.num_output_tokens
        reason: FinishReason | None = None
        min_ok = n_out >= self.params.min_tokens
        if self.matcher is not None and self.matcher.dead_end:
            # the mask allowed nothing (only the forced EOS): not a normal stop
            reason = FinishReason.ERROR
        elif min_ok and (token_id in self.eos_token_ids or token_id in self.stop_ids):
            reason = FinishReason.STOP
        # the grammar admits nothing after this token: it still counts as text
        grammar_end = (reason is None and self.matcher is not None
                       and (not self.matcher.consume(token_id) or self.matcher.done))
        new_text = ""
        if self.detok is not None:
            # a stopping special token contributes no text
            delta = self.detok.step([token_id]) if reason is None else ""
            new_text, stopped = self.stop.check(self.text, delta)
            if stopped:
                reason = FinishReason.STOP
        if reason is None and grammar_end:
            reason = FinishReason.STOP
        if reason is None and (
            (self.params.max_tokens is not None and n_out >= self.params.max_tokens)
            or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None and self.detok is not None and not self.stop.stopped:
            # release what the detokenizer and the stop checker still hold
            tail, stopped = self.stop.check(self.text + new_text, self.detok.flush())
            new_text += tail + self.stop.flush()
            if stopped:
                reason = FinishReason.STOP
        self.text += new_text
        out = RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=[token_id],
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=n_out,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=[logprobs] if logprobs is not None else None,
            prompt_logprobs=self._first_output_prompt_logprobs(),
        )
        return out, reason
