"""The engine: one model, one KV cache, a scheduler, a sampler.

Every worker role uses it: the prefill worker runs prompts with
``prefill_only`` and exports their KV; the decode worker imports KV into
reserved blocks and continues; the colocated worker does both. Moving KV
between engines goes through ``kv_port`` (``splitserve.engine.kv_port``).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.errors import CheckpointError, EngineDeadError, InvalidRequestError
from splitserve.engine.isolation import is_fatal
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.kv_port import KVPort
from splitserve.engine.loader import load_checkpoint, load_model
from splitserve.engine.lora.adapter import AdapterRef
from splitserve.engine.lora.manager import LoraManager
from splitserve.engine.lora.registry import AdapterRegistry
from splitserve.engine.model_runner import (ModelRunner, kv_cache_dtype, num_kv_blocks,
                                            num_live_state_slots, num_state_checkpoints, resolve_dtype)
from splitserve.engine.outputs import CompletionResult, RequestOutput
from splitserve.engine.parallel.launcher import start_ranks
from splitserve.engine.request_state import RequestState
from splitserve.engine.sampler import Sampler, TokenLogprobs
from splitserve.engine.sampling_params import SamplingParams, validate_request
from splitserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from splitserve.engine.sequence import FinishReason, Sequence
from splitserve.engine.spec.decoder import SpecDecoder
from splitserve.engine.spec.proposer import ProposerContext
from splitserve.engine.state_cache import StateSlots
from splitserve.engine.state_checkpoints import StateCheckpoints
from splitserve.engine.stats import EngineLoad
from splitserve.engine.step_guard import StepGuard
from splitserve.engine.structured import GrammarCompiler, GrammarMatcher
from splitserve.engine.tokenizer import Tokenizer

log = logging.getLogger("splitserve.engine")

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
        hybrid = self.model_cfg.options.hybrid
        torch.manual_seed(cfg.seed)
        tp = None
        if cfg.tensor_parallel_size > 1:  # ranks 1..N-1 start loading their shards now
            tp, num_blocks = start_ranks(cfg, self.checkpoint, self.dtype, self.device)
        else:
            num_blocks = num_kv_blocks(cfg, self.model_cfg, kv_cache_dtype(cfg, self.dtype), self.dtype)
        try:
            model = load_model(self.checkpoint, self.dtype, self.device,
                               tp=None if tp is None else tp.group)
            if hybrid is not None and cfg.speculative is not None and not model.keeps_verify_states:
                raise CheckpointError(
                    f"{self.model_cfg.architecture}: speculative decoding is not supported for this "
                    "hybrid model (its recurrent layers cannot roll rejected drafts back); remove "
                    "speculative from the model's config")
            # LoRA: slots allocated before the runner captures CUDA graphs over them
            self.lora: LoraManager | None = None
            if cfg.max_loras > 0:
                self.lora = LoraManager(model, self.model_cfg, cfg.max_loras, cfg.max_lora_rank,
                                        cfg.max_cpu_loras or 4 * cfg.max_loras, self.dtype,
                                        self._live_adapter_keys, tp)
            self.runner = ModelRunner(model, self.model_cfg, cfg, self.dtype, self.device,
                                      num_blocks, tp=tp)
            if tp is not None:
                tp.wait_ready(self.runner.kv_cache)
                tp.kv.state = self.runner.state  # hand-offs of states gather from every rank
        except BaseException:
            if tp is not None:
                tp.close()
            raise
        # hybrid models: a recurrent-state slot per sequence beside its blocks; prefix
        # caching with state checkpoints in the slots after the live ones
        states = checkpoints = None
        if hybrid is not None:
            live = num_live_state_slots(cfg)
            states = StateSlots(live)
            if num_state_checkpoints(cfg) > 0:
                checkpoints = StateCheckpoints(live, num_state_checkpoints(cfg),
                                               self.runner.copy_state)
        self.kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching, states, checkpoints)
        self.requests: dict[str, RequestState] = {}
        self.adapters = AdapterRegistry(self.lora)  # served by name (add_adapter)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   slots=self.lora)
        self.sampler = Sampler(seed=cfg.seed)
        self.max_model_len = min(
            cfg.max_model_len or self.model_cfg.max_position,
            self.model_cfg.max_position,
            num_blocks * cfg.block_size,
        )
        if cfg.max_model_len and cfg.max_model_len > self.model_cfg.max_position:
            # RoPE and learned position tables end at max_position_embeddings: positions
            # past it have no rotation or no row (GPT-2, OPT), so the context is capped there
            log.warning("max_model_len %d is past the model's max_position_embeddings %d: "
                        "serving %d tokens of context", cfg.max_model_len,
                        self.model_cfg.max_position, self.max_model_len)
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
        self._prefill_only: set[str] = set()
        self.step_count = 0
        self.busy_time_s = 0.0
        self.prompt_tokens_computed = 0
        self.num_failed_requests = 0  # ended alone by a fault in their processing
        self.failures_in_a_row = 0  # failed requests since a step last made progress
        self.max_consecutive_failures = 8
        self.kv_port = KVPort(self)
        self.guard = StepGuard(self)  # forward and sampling, failing requests alone
        self.spec: SpecDecoder | None = None
        if cfg.speculative is not None:
            self.spec = SpecDecoder(cfg.speculative, ProposerContext(
                cfg, self.model_cfg, self.tokenizer, self.dtype, self.device, num_blocks))
            self.scheduler.on_release = self.spec.release

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (they also stop when
        this process ends). The engine cannot step after. Idempotent."""
        if self.runner.tp is not None:
            self.runner.tp.close()

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

    # -- LoRA adapters ----------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> AdapterRef:
        """Serve the adapter in folder ``path`` as ``name`` (``AdapterRegistry.add``)."""
        return self.adapters.add(name, path)

    def remove_adapter(self, name: str) -> bool:
        """Stop serving adapter ``name`` (``AdapterRegistry.remove``)."""
        return self.adapters.remove(name)

    def resolve_adapter(self, adapter: "str | AdapterRef | None") -> AdapterRef | None:
        """A request's adapter, ready in host memory (``AdapterRegistry.resolve``)."""
        return self.adapters.resolve(adapter)

    def _live_adapter_keys(self) -> set[str]:
        return {st.seq.adapter.key for st in self.requests.values() if st.seq.adapter is not None}

    def new_request_state(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, matcher: GrammarMatcher | None,
                          adapter: AdapterRef | None = None) -> RequestState:
        """A new sequence and its output state, registered nowhere yet."""
        seq = Sequence(request_id, prompt_token_ids, params, self.cfg.block_size, self.hash_salt,
                       adapter=adapter)
        return RequestState(seq, params, self.tokenizer, self.eos_token_ids, self.max_model_len,
                            self.grammar, matcher)

    def add_request(self, request_id: str | None, prompt: str | None = None,
                    params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None,
                    prefill_only: bool = False, matcher: GrammarMatcher | None = None,
                    adapter: "str | AdapterRef | None" = None) -> str:
        """Queue a request. ``prefill_only``: stop after the first token and
        hold the KV for ``kv_port.export_layers`` (the prefill role). ``matcher``: from
        ``build_matcher`` (else built here when the request is constrained).
        ``adapter``: the LoRA adapter it runs with (``resolve_adapter``)."""
        request_id = request_id or uuid.uuid4().hex
        self.check_id_free(request_id)
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise InvalidRequestError("either prompt or prompt_token_ids is required", param="prompt")
            prompt_token_ids = self.tokenize(prompt)
        self.validate(prompt_token_ids, params)
        ref = self.resolve_adapter(adapter)
        st = self.new_request_state(request_id, prompt_token_ids, params, matcher, ref)
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
        return len(self.scheduler.waiting) + len(self.scheduler.parked)

    def pending_prompt_tokens(self) -> int:
        seqs = list(self.scheduler.waiting) + self.scheduler.running + self.scheduler.parked
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
            open_requests=len(self.requests), block_owners=len(self.kv.owners()),
            **self.adapters.load(), **self._spec_stats())

    def _spec_stats(self) -> dict:
        if self.spec is None:
            return {}
        c = self.spec.counters
        return dict(spec_drafts=c.drafts, spec_draft_tokens=c.draft_tokens,
                    spec_accepted_tokens=c.accepted_tokens, spec_draft_time_s=c.draft_time_s)

    # -- the loop -------------------------------------------------------------
    def step(self, layer_listener: LayerListener | None = None) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return the new outputs.

        ``layer_listener(scheduled)`` may return a callback the model calls
        with each layer index once that layer's KV is stored (the prefill
        worker starts layer-group transfers from it); a forward run again
        to find a failing request calls it again for that part.

        A request whose share of the step raises (its rows of the forward,
        its sampling, its prompt logprobs or its output: text, stop checks,
        grammar) ends alone: its last output carries a RequestFailedError
        and its blocks are freed; the others go on (``engine.step_guard``).
        The step raises instead, leaving the engine to be stopped, on a
        device error, when the forward fails for every request and for a
        one-token probe, or when ``max_consecutive_failures`` requests
        failed with no step making progress in between."""
        t0 = time.perf_counter()  # busy time includes drafting
        sched = self.scheduler.schedule(self.spec.propose(self) if self.spec else None)
        if sched.is_empty:
            return []
        outputs: list[RequestOutput] = []
        ran = self.guard.forward(sched.scheduled, layer_listener, outputs)
        sampled: list[tuple[RequestState, int, TokenLogprobs | None]] = []
        for part, (logits, rows, prompt_lps) in ran:
            if self.spec is not None:  # a sequence's first row here, its draft rows held
                logits, rows = self.spec.begin_verify(self, part, logits, rows)
            sampled += self.guard.sample(part, logits, rows, prompt_lps, outputs)
        done = [s for part, _ in ran for s in part if not s.seq.is_finished]
        self.scheduler.commit(SchedulerOutput(scheduled=done))
        self.step_count += 1
        self.prompt_tokens_computed += sum(
            s.num_new_tokens for s in done if s.num_new_tokens - len(s.spec_token_ids) > 1)
        now = time.monotonic()
        for st, tok, lp in sampled:
            if st.seq.is_finished:  # failed at sampling
                continue
            try:
                outputs.append(self._take_token(st, tok, lp, now))
            except Exception as e:  # noqa: BLE001 - this request's fault alone
                if is_fatal(e):
                    raise
                outputs.append(self.guard.fail(st, "output processing", e))
        if self.spec is not None:  # the rest of each draft run; KV rollback
            outputs = self.spec.finish_verify(self, outputs, now)
        if any(s.seq.finish_reason is not FinishReason.ABORT for s in done):
            self.failures_in_a_row = 0  # some request moved on (failed ones end as ABORT)
        self.busy_time_s += time.perf_counter() - t0
        if self.failures_in_a_row >= self.max_consecutive_failures:
            raise EngineDeadError(
                f"{self.failures_in_a_row} requests failed in a row with no step making "
                "progress: the engine is taken to be broken")
        return outputs

    def _take_token(self, st: RequestState, tok: int, lp: TokenLogprobs | None,
                    now: float) -> RequestOutput:
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
        return out

    def generate(self, prompts: Iterable[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: "list[str | AdapterRef | None] | None" = None) -> list[CompletionResult]:
        """Run prompts to completion together (continuous batching);
        ``adapters``: each prompt's LoRA adapter (None: the base model)."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        alist = adapters if adapters is not None else [None] * len(prompts)
        if len(alist) != len(prompts):
            raise ValueError(f"{len(alist)} adapters for {len(prompts)} prompts")
        for p, sp, ad in zip(prompts, plist, alist):
            if isinstance(p, str):
                ids.append(self.add_request(None, prompt=p, params=sp, adapter=ad))
            else:
                ids.append(self.add_request(None, prompt_token_ids=list(p), params=sp, adapter=ad))
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
                if out.error is not None:
                    r.error = str(out.error)
                if out.finished:
                    r.finish_reason = out.finish_reason
                    r.num_cached_tokens = out.num_cached_tokens
        return [results[r] for r in ids]
