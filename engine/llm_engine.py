"""The engine: one model, one KV cache, a scheduler, a sampler.

Every worker role uses it: the prefill worker runs prompts with
``prefill_only`` and exports their KV; the decode worker imports KV into
reserved blocks and continues; the colocated worker does both. Moving KV
between engines goes through ``kv_port`` (``splitserve.engine.kv_port``).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.kv_port import KVPort
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.model_runner import ModelRunner, num_kv_blocks, resolve_dtype, kv_cache_dtype
from splitserve.engine.outputs import CompletionResult, RequestOutput
from splitserve.engine.request_state import RequestState
from splitserve.engine.sampler import Sampler
from splitserve.engine.sampling_params import SamplingParams, validate_request
from splitserve.engine.scheduler import ScheduledSeq, Scheduler
from splitserve.engine.sequence import FinishReason, Sequence
from splitserve.engine.stats import EngineLoad
from splitserve.engine.structured import GrammarCompiler, GrammarMatcher
from splitserve.engine.tokenizer import Tokenizer


LayerListener = Callable[[list[ScheduledSeq]], Callable[[int], None] | None]


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.checkpoint = load_checkpoint(Path(cfg.model))
        self.model_cfg = self.checkpoint.model_config
        self.model_id = cfg.model_id or Path(cfg.model).resolve().name
        self.device = torch.device(cfg.device)
        self.dtype = resolve_dtype(cfg, self.model_cfg, self.device)
        self.tokenizer = Tokenizer.from_dir(Path(cfg.model))
        torch.manual_seed(cfg.seed)
        model = load_model(self.checkpoint, self.dtype, self.device)
        num_blocks = num_kv_blocks(cfg, self.model_cfg, kv_cache_dtype(cfg, self.dtype))
        self.kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.runner = ModelRunner(model, self.model_cfg, cfg, self.dtype, self.device, num_blocks)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.sampler = Sampler(seed=cfg.seed)
        self.max_model_len = min(
            cfg.max_model_len or self.model_cfg.max_position,
            self.model_cfg.max_position,
            num_blocks * cfg.block_size,
        )
        gen_eos = self.checkpoint.generation_config.get("eos_token_id")
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_cfg.eos_token_ids)
        if gen_eos is not None:
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_token_ids = tuple(sorted(eos))
        self.grammar = GrammarCompiler(self.tokenizer, self.model_cfg.vocab_size, self.eos_token_ids)
        self.grammar.warm()  # no constrained request waits for the tokenizer view
        # Prefix caches are per engine (one model each), so no per-model salt:
        # the router hashes prompts with the same function and no salt.
        self.hash_salt = b""
        self.requests: dict[str, RequestState] = {}
        self._prefill_only: set[str] = set()
        self.step_count = 0
        self.busy_time_s = 0.0
        self.prompt_tokens_computed = 0
        self.kv_port = KVPort(self)

    # -- requests -----------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError (with ``param``) if this request cannot run."""
        validate_request(prompt_token_ids, params, self.max_model_len, self.model_cfg.vocab_size)

    def build_matcher(self, prompt_token_ids: list[int], params: SamplingParams) -> GrammarMatcher | None:
        """The structured-output matcher of a request (None without a
        constraint), for ``add_request(matcher=...)``. Safe to call from any
        thread, and meant to be: a large JSON schema takes tens of
        milliseconds to compile, which on the engine thread would stall
        every running sequence. Validates the request first."""
        self.validate(prompt_token_ids, params)
        if params.structured_output is None:
            return None
        # a resumed request's earlier output ends its prompt (as RequestState reads it)
        earlier = prompt_token_ids[len(prompt_token_ids) - params.resumed_tokens:]
        return self.grammar.matcher(params.structured_output, earlier)

    def new_request_state(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, matcher: GrammarMatcher | None) -> RequestState:
        """A new sequence and its output state, registered nowhere yet."""
        seq = Sequence(request_id, prompt_token_ids, params, self.cfg.block_size, self.hash_salt)
        return RequestState(seq, params, self.tokenizer, self.eos_token_ids, self.max_model_len,
                            self.grammar, matcher)

    def add_request(self, request_id: str | None, prompt: str | None = None,
                    params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None,
                    prefill_only: bool = False, matcher: GrammarMatcher | None = None) -> str:
        """Queue a request. ``prefill_only``: stop after the first token and
        hold the KV for ``kv_port.export_layers`` (the prefill role). ``matcher``: from
        ``build_matcher`` (else built here when the request is constrained)."""
        request_id = request_id or uuid.uuid4().hex
        self.check_id_free(request_id)
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("either prompt or prompt_token_ids is required", param="prompt")
            prompt_token_ids = self.tokenize(prompt)
        self.validate(prompt_token_ids, params)
        st = self.new_request_state(request_id, prompt_token_ids, params, matcher)
        self.requests[request_id] = st
        if prefill_only:
            self._prefill_only.add(request_id)
        self.scheduler.add(st.seq)
        return request_id

    def check_id_free(self, request_id: str) -> None:
        """Raise unless no request, and no blocks, go by ``request_id``: one
        id names one sequence (its blocks are found by it)."""
        if request_id in self.requests or self.kv.has_owner(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")

    def abort(self, request_id: str) -> bool:
        """Cancel a request at any point (a hand-off still being received
        included) and free its blocks. Returns whether it was known."""
        st = self.requests.pop(request_id, None)
        self._prefill_only.discard(request_id)
        if st is None:
            if self.kv_port.cancel_held(request_id):
                return True
            self.kv.free(request_id)
            return False
        if not st.seq.is_finished:
            self.scheduler.finish(st.seq, FinishReason.ABORT)
        self.kv.free(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def pending_prompt_tokens(self) -> int:
        seqs = list(self.scheduler.waiting) + self.scheduler.running
        return sum(max(0, s.num_tokens - s.num_computed_tokens - 1) for s in seqs)

    def load_stats(self) -> EngineLoad:
        """What every worker role reports about its engine's load."""
        return EngineLoad(
            pending_prompt_tokens=self.pending_prompt_tokens(), running=self.num_running,
            waiting=self.num_waiting, max_seqs=self.cfg.max_num_seqs,
            free_blocks=self.kv.num_free_blocks, total_blocks=self.kv.num_blocks,
            block_size=self.cfg.block_size, busy_time_s=self.busy_time_s, steps=self.step_count,
            prompt_tokens_computed=self.prompt_tokens_computed,
            preemptions=self.scheduler.num_preemptions, prefix_hits=self.kv.pool.hits,
            prefix_queries=self.kv.pool.queries, cached_blocks=len(self.kv.pool.hash_to_block),
            open_requests=len(self.requests), block_owners=len(self.kv.owners()))

    # -- the loop -------------------------------------------------------------
    def step(self, layer_listener: LayerListener | None = None) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return the new outputs.

        ``layer_listener(scheduled)`` may return a callback the model calls
        with each layer index once that layer's KV is stored (the prefill
        worker starts layer-group transfers from it)."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        t0 = time.perf_counter()
        on_layer_done = layer_listener(sched.scheduled) if layer_listener else None
        logits, rows, prompt_lps = self.runner.execute(sched.scheduled, self.kv, on_layer_done)
        for i, scored in prompt_lps.items():
            self.requests[sched.scheduled[i].seq.seq_id].add_prompt_logprobs(scored)
        states = [self.requests[sched.scheduled[i].seq.seq_id] for i in rows]
        tokens, lps = self.sampler(logits, [st.prepare_sampling() for st in states])
        self.scheduler.commit(sched)
        self.step_count += 1
        self.prompt_tokens_computed += sum(
            s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1)
        now = time.monotonic()
        outputs = []
        for st, tok, lp in zip(states, tokens, lps):
            seq = st.seq
            if seq.first_token_time is None:
                seq.first_token_time = now
            rid = seq.seq_id
            if rid in self._prefill_only:
                # the receiving engine processes the first token (stop checks,
                # text) as if it had sampled it; here it is only recorded
                out, reason = st.record_handoff_token(tok, lp), FinishReason.HANDOFF
            else:
                out, reason = st.on_token(tok, lp)
            if reason is not None:
                keep = reason is FinishReason.HANDOFF
                self.scheduler.finish(seq, reason, keep_blocks=keep)
                self._prefill_only.discard(rid)
                if not keep:
                    del self.requests[rid]
            out.metrics = {"arrival": seq.arrival_time, "first_token": seq.first_token_time or now,
                           "first_scheduled": seq.first_scheduled_time or seq.arrival_time}
            outputs.append(out)
        self.busy_time_s += time.perf_counter() - t0
        return outputs

    def generate(self, prompts: Iterable[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionResult]:
        """Run prompts to completion together (continuous batching)."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        for p, sp in zip(prompts, plist):
            if isinstance(p, str):
                ids.append(self.add_request(None, prompt=p, params=sp))
            else:
                ids.append(self.add_request(None, prompt_token_ids=list(p), params=sp))
        results: dict[str, CompletionResult] = {}
        for rid in ids:
            st = self.requests[rid]
            results[rid] = CompletionResult(rid, st.seq.prompt_token_ids, [], "", None)
        while self.has_unfinished():
            for out in self.step():
                r = results[out.request_id]
                r.token_ids.extend(out.new_token_ids)
                r.text += out.new_text
                if out.new_logprobs:
                    r.logprobs = (r.logprobs or []) + out.new_logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    r.finish_reason = out.finish_reason
                    r.num_cached_tokens = out.num_cached_tokens
        return [results[r] for r in ids]
