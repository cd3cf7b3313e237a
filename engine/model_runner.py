"""Owns the model, the KV cache tensor and the per-step input tensors.

The scheduler hands over ``ScheduledSeq`` items (plain integers); this
module turns them into the flat batch the model runs on and returns the
logits of the sequences whose chunk reached their last token (and, for
requests that ask, the logprobs of their prompt tokens). A sequence with
draft tokens (speculative decoding) runs its last token and its drafts as
one multi-token chunk, like a prompt chunk, and returns a logit row for
each of them, consecutive and in order. Such verify steps are not
decode-only, so they run eagerly, never through the captured CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import DTYPES, EngineConfig, ModelConfig
from splitserve.engine.kv_manager import KVCacheManager
from splitserve.engine.parallel.launcher import TensorParallelRanks
from splitserve.engine.parallel.messages import StepCommand
from splitserve.engine.sampler import TokenLogprobs
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.engine.state_cache import RecurrentState
from splitserve.kernels import ops
from splitserve.kernels.lora import LoraMeta, lora_meta_runs


def resolve_dtype(cfg: EngineConfig, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype and cfg.dtype != "auto":
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        return DTYPES[cfg.dtype]
    dtype = model_cfg.torch_dtype
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32  # CPU half-precision matmuls are slow and less exact
    return dtype


def kv_cache_dtype(cfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    return torch.float8_e4m3fn if cfg.kv_cache_dtype == "fp8" else dtype


def num_live_state_slots(cfg: EngineConfig) -> int:
    """Live recurrent-state slots of a hybrid model's engine: the running
    batch's, as many again for hand-off imports parked or reserved beside it."""
    return 2 * cfg.max_num_seqs


def num_state_checkpoints(cfg: EngineConfig) -> int:
    """State checkpoint slots (``splitserve.engine.state_checkpoints``):
    ``state_checkpoints`` (None: ``max_num_seqs``); none without prefix caching."""
    if not cfg.enable_prefix_caching:
        return 0
    return cfg.max_num_seqs if cfg.state_checkpoints is None else cfg.state_checkpoints


def num_state_slots(cfg: EngineConfig) -> int:
    """Every recurrent-state slot: the live ones, then the checkpoints."""
    return num_live_state_slots(cfg) + num_state_checkpoints(cfg)


def num_kv_blocks(cfg: EngineConfig, model_cfg: ModelConfig, kv_dtype: torch.dtype,
                  dtype: torch.dtype | None = None) -> int:
    """Blocks that fit ``kv_cache_memory_gb`` (a hybrid model's recurrent
    states, ``num_state_slots`` of them in ``dtype``, come out of it first)."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    per_block = model_cfg.kv_bytes_per_token(kv_dtype) * cfg.block_size
    budget = int(cfg.kv_cache_memory_gb * (1 << 30))
    hybrid = model_cfg.options.hybrid
    if hybrid is not None:
        elem = torch.empty((), dtype=dtype or model_cfg.torch_dtype).element_size()
        states = hybrid.state_bytes_per_sequence(elem) * num_state_slots(cfg)
        if states >= budget:
            raise ValueError(
                f"kv_cache_memory_gb {cfg.kv_cache_memory_gb} cannot hold the recurrent states of "
                f"{num_state_slots(cfg)} sequences ({states / (1 << 30):.2f} GiB: twice max_num_seqs "
                f"live, {num_state_checkpoints(cfg)} state_checkpoints) and any KV block: raise "
                "kv_cache_memory_gb, or lower max_num_seqs or state_checkpoints")
        budget -= states
    if per_block == 0:  # no attention layer: blocks only count tokens
        max_len = cfg.max_model_len or model_cfg.max_position
        return num_state_slots(cfg) * -(-max_len // cfg.block_size)
    return max(16, budget // per_block)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor  # [N] rows of the flat batch whose logits are needed
    logit_seqs: list[int]  # index into the scheduled list for each logit row
    # prompt logprobs: the flat row at prompt position p scores prompt token p+1
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_owners: list[tuple[int, int]] = field(default_factory=list)  # (scheduled index, p)
    lora: LoraMeta | None = None  # each token's adapter slot; None: no token has one
    lora_runs: list[tuple[int, int]] | None = None  # what ``lora`` was built from
    fresh_slots: list[int] = field(default_factory=list)  # recurrent states to zero first
    # (checkpoint slot, live slot): states of sequences resuming from a prefix hit, copied first
    restores: list[tuple[int, int]] = field(default_factory=list)


# Devices whose verify steps (every sequence: its last token and its draft
# tokens, no prompt chunk) run their attention as decode rows, one per
# token (``verify_rows_as_decode``). On the CPU the batched decode path is a
# handful of tensor ops per layer, where the multi-token path regroups the
# queries per layer (host lists, masks, index copies): at batch 1 that
# regrouping was most of what a 5-token verify step cost over a plain one.
# GPU kernels take a verify chunk in one launch already, and their captured
# graphs are sized for decode batches, so they keep the chunked form.
VERIFY_AS_DECODE_DEVICES = ("cpu",)
# Only steps of this many tokens at most: each decode row gathers its
# sequence's whole context, so past a few rows the regrouped chunk is the
# cheaper form (measured with ``bench_spec --step-costs``, the default model,
# one thread: 5 rows at batch 1 cost 1.25-1.28 plain forwards against 1.32,
# 9 rows the same 1.4-1.5 either way, 13 rows 1.7-1.8 against 1.6, and
# batch 8 with 3 rows each 1.38 against 1.31).
VERIFY_AS_DECODE_MAX_TOKENS = 8


def verify_rows_as_decode(scheduled: list[ScheduledSeq], ctx: list[int],
                          tables: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """A verify step's attention metadata with each query token as its own
    decode row: row j of a sequence whose chunk ends at context ``c`` with
    ``n`` tokens sees the cache up to position ``c - n + j`` (causal within
    the chunk, as the chunked form), through the sequence's block table.
    The tokens were stored before attention reads the cache, so every row
    sees its own and earlier drafts. Returns (cu_query_lens, context_lens,
    block tables), one entry per token."""
    row_ctx: list[int] = []
    row_tables: list[list[int]] = []
    for s, c, t in zip(scheduled, ctx, tables):
        n = s.num_new_tokens
        row_ctx.extend(range(c - n + 1, c + 1))
        row_tables.extend([t] * n)
    return list(range(len(row_ctx) + 1)), row_ctx, row_tables


PROMPT_LOGPROB_ROWS = 256  # vocabulary projections per slice when scoring prompts


def step_command(inp: StepInputs, state_ops: list[tuple[str, int, int]]) -> StepCommand:
    """The step as the other tensor-parallel ranks receive it, after the
    recurrent-state ``state_ops`` rank 0 ran since the last one."""
    m = inp.meta
    return StepCommand(
        input_ids=inp.input_ids.tolist(), positions=inp.positions.tolist(),
        slot_mapping=m.slot_mapping.tolist(), block_tables=m.block_tables.tolist(),
        cu_query_lens=m.cu_query_lens.tolist(), context_lens=m.context_lens.tolist(),
        decode_only=m.decode_only, k_scale=m.k_scale, v_scale=m.v_scale,
        logit_rows=inp.logit_rows.tolist(), prompt_rows=list(inp.prompt_rows),
        state_ops=list(state_ops), fresh_slots=list(inp.fresh_slots), restores=list(inp.restores),
        state_slots=None if m.state_slots is None else m.state_slots.tolist(),
        query_lens=m.query_lens, keep_states=m.keep_states, lora_runs=inp.lora_runs)

# scheduled index -> [(prompt position p, logprobs of prompt token p + 1)]
PromptLogprobs = dict[int, list[tuple[int, TokenLogprobs]]]


class ModelRunner:
    """``tp``: the replica's other tensor-parallel ranks (``splitserve.engine.
    parallel.launcher``), or None; then ``model`` is rank 0's shard, the
    cache holds rank 0's KV heads, and every step is sent to the other
    ranks before it runs here."""

    def __init__(self, model, model_cfg: ModelConfig, cfg: EngineConfig,
                 dtype: torch.dtype, device: torch.device, num_blocks: int,
                 tp: TensorParallelRanks | None = None):
        if cfg.weight_dtype == "fp8":  # before CUDA graphs capture the projections
            model.quantize_fp8_()
        self.model = model
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.tp = tp
        self.lora_slots = cfg.max_loras  # the model's LoRA stacks are allocated (LoraManager)
        self.device = device
        self.dtype = dtype
        self.block_size = cfg.block_size
        self.kv_dtype = kv_cache_dtype(cfg, dtype)
        # [L, planes, NB, BS, Hk, D] (Hk: this rank's heads; planes: keys and values, or one
        # latent for both); zeroed so unused slots never hold NaNs
        self.kv_cache = torch.zeros(
            model_cfg.num_cache_layers, model_cfg.kv_planes, num_blocks, cfg.block_size,
            model.cfg.num_kv_heads, model_cfg.head_dim, dtype=self.kv_dtype, device=device,
        )
        self.k_scale = float(cfg.extra.get("k_scale", 1.0))
        self.v_scale = float(cfg.extra.get("v_scale", 1.0))
        self.scale = 1.0 / math.sqrt(model_cfg.head_dim)
        # hybrid models: the recurrent layers' states, one slot per sequence (tensor
        # parallel: this rank's heads', as the shard's config lays them out)
        self.state: RecurrentState | None = None
        if model_cfg.options.hybrid is not None:
            self.state = RecurrentState(model.cfg.options.hybrid, num_state_slots(cfg), dtype, device)
            model.bind_state(self.state)
        # tensor parallel: state copies and rollbacks since the last step, which the
        # other ranks repeat before it (StepCommand.state_ops)
        self.state_ops: list[tuple[str, int, int]] = []
        self.graphs = None
        # (hybrid models run eagerly: their recurrent layers loop over the batch's sequences)
        if device.type == "cuda" and not cfg.enforce_eager and tp is None and self.state is None:
            from splitserve.engine.cuda_graphs import CudaGraphRunner

            max_len = cfg.max_model_len or model_cfg.max_position
            self.graphs = CudaGraphRunner(
                model, self.kv_cache, cfg.max_num_seqs, -(-max_len // cfg.block_size),
                self.k_scale, self.v_scale, lora_slots=self.lora_slots)
            self.graphs.capture()

    def prepare(self, scheduled: list[ScheduledSeq], kv: KVCacheManager) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        logit_seqs: list[int] = []
        p_rows: list[int] = []
        p_targets: list[int] = []
        p_owners: list[tuple[int, int]] = []
        lora_runs: list[tuple[int, int]] = []
        state_slots: list[int] = []
        fresh: list[int] = []
        restores: list[tuple[int, int]] = []
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n - len(s.spec_token_ids)  # the sequence's own tokens
            if getattr(seq.params, "prompt_logprobs", None) is not None:
                for p in range(start, min(end, seq.num_prompt_tokens - 1)):
                    p_rows.append(cu[-1] + p - start)
                    p_targets.append(seq.token_ids[p + 1])
                    p_owners.append((i, p))
            table = kv.raw_block_ids(seq.seq_id)
            if self.state is not None:
                state_slots.append(kv.state_slot(seq.seq_id))
                if start == 0:  # from its first token: a new prompt, or recomputed
                    fresh.append(state_slots[-1])
                elif (src := kv.restore_slot(seq.seq_id)) is not None:  # from a prefix hit
                    restores.append((src, state_slots[-1]))
            lora_runs.append((seq.lora_slot, n))
            ids.extend(seq.token_ids[start:end])
            spec = s.spec_token_ids  # draft tokens after the last token: one logit row each
            ids.extend(spec)
            stop = end + len(spec)
            pos.extend(range(start, stop))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, stop))
            cu.append(cu[-1] + n)
            ctx.append(stop)
            tables.append(table)
            if spec or end == seq.num_tokens:
                first = cu[-1] - 1 - len(spec)
                logit_rows.extend(range(first, cu[-1]))
                logit_seqs.extend([i] * (1 + len(spec)))
        decode_only = len(ids) == len(scheduled)
        if (not decode_only and self.state is None and self.device.type in VERIFY_AS_DECODE_DEVICES
                and len(ids) <= VERIFY_AS_DECODE_MAX_TOKENS
                and all(s.num_new_tokens - len(s.spec_token_ids) == 1 for s in scheduled)):
            cu, ctx, tables = verify_rows_as_decode(scheduled, ctx, tables)
            decode_only = True
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            cu_query_lens=torch.tensor(cu, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            decode_only=decode_only,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        if self.state is not None:
            meta.state_slots = torch.tensor(state_slots, dtype=torch.int64, device=dev)
            meta.query_lens = tuple(s.num_new_tokens for s in scheduled)
            meta.keep_states = tuple(bool(s.spec_token_ids) for s in scheduled)
        with_lora = bool(self.lora_slots) and any(slot >= 0 for slot, _ in lora_runs)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            meta=meta,
            logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=dev),
            logit_seqs=logit_seqs,
            prompt_rows=p_rows,
            prompt_targets=p_targets,
            prompt_owners=p_owners,
            lora=lora_meta_runs(lora_runs, self.lora_slots, dev) if with_lora else None,
            lora_runs=lora_runs if with_lora else None,
            fresh_slots=fresh,
            restores=restores,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], kv: KVCacheManager,
                on_layer_done=None) -> tuple[torch.Tensor, list[int], PromptLogprobs]:
        """Run one step. Returns (logits [N, V] float32, scheduled index per
        row, the prompt logprobs of this step's chunks where asked for).

        ``on_layer_done(layer_index)`` is called after each layer's KV is in
        the cache (the prefill worker starts layer-group transfers from it)."""
        inp = self.prepare(scheduled, kv)
        if self.tp is None:
            return self._run(inp, scheduled, on_layer_done)
        ops, self.state_ops = self.state_ops, []
        self.tp.send_step(step_command(inp, ops))
        try:
            return self._run(inp, scheduled, on_layer_done)
        except Exception as e:  # the other ranks may wait in a collective: fatal
            raise self.tp.broken(e) from e

    def _run(self, inp: StepInputs, scheduled: list[ScheduledSeq],
             on_layer_done) -> tuple[torch.Tensor, list[int], PromptLogprobs]:
        # The other tensor-parallel ranks repeat these model calls in this
        # order (splitserve.engine.parallel.rank_worker.run_step).
        hidden = None
        if self.state is not None:
            self.state.clear_kept()
            self.state.zero(inp.fresh_slots)
            for src, dst in inp.restores:
                self.state.copy_slot(src, dst)
        if self.graphs is not None and on_layer_done is None:
            hidden = self.graphs.run(inp.input_ids, inp.positions, inp.meta, inp.lora)
        if hidden is None:
            kwargs = {"on_layer_done": on_layer_done} if on_layer_done is not None else {}
            if inp.lora is not None:
                kwargs["lora"] = inp.lora
            hidden = self.model(inp.input_ids, inp.positions, self.kv_cache, inp.meta, **kwargs)
        prompt_lps = self._prompt_logprobs(hidden, inp, scheduled) if inp.prompt_rows else {}
        if inp.logit_rows.numel() == 0:
            return (hidden.new_empty((0, self.model_cfg.vocab_size), dtype=torch.float32), [],
                    prompt_lps)
        logits = self.model.compute_logits(hidden.index_select(0, inp.logit_rows))
        return logits.float(), inp.logit_seqs, prompt_lps

    def copy_state(self, src: int, dst: int) -> None:
        """Copy recurrent-state slot ``src`` into ``dst`` (state checkpoints),
        on every rank."""
        self.state.copy_slot(src, dst)
        if self.tp is not None:
            self.state_ops.append(("copy", src, dst))

    def rollback_state(self, slot: int, tokens: int) -> None:
        """``RecurrentState.rollback`` of ``slot`` to ``tokens`` of its verify
        chunk, on every rank."""
        self.state.rollback(slot, tokens)
        if self.tp is not None:
            self.state_ops.append(("rollback", slot, tokens))

    def pack_state(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of recurrent-state slot ``slot``, whole: name -> [state
        layers, *shape] (tensor parallel: gathered from the ranks)."""
        if self.tp is not None:
            return self.tp.kv.pack_state(slot)
        return self.state.pack(slot)

    def unpack_state(self, slot: int, states: dict[str, torch.Tensor]) -> None:
        """Write ``pack_state``'s output (of an engine of the same model, any
        TP degree) into ``slot`` (tensor parallel: each rank its rows).
        Raises ValueError when the kinds or shapes differ."""
        if self.tp is not None:
            # the copies and rollbacks not yet sent may touch ``slot`` (its last
            # owner's): the ranks repeat them before the import, not after it
            self.tp.kv.unpack_state(slot, states, self.state_ops)
            self.state_ops = []
            return
        self.state.unpack(slot, states)

    def pack_kv(self, block_ids: list[int], layer_start: int, layer_end: int) -> torch.Tensor:
        """Layers [layer_start, layer_end) of ``block_ids``, every KV head:
        [layers, 2, n, BS, Hk, D] (tensor parallel: gathered from the ranks)."""
        if self.tp is not None:
            return self.tp.kv.pack(block_ids, layer_start, layer_end)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        return ops.pack_kv(self.kv_cache, idx, layer_start, layer_end)

    def unpack_kv(self, buf: torch.Tensor, block_ids: list[int], layer_start: int) -> None:
        """Store ``buf`` (from ``pack_kv``, every head) into ``block_ids``
        from layer ``layer_start`` on (tensor parallel: each rank its heads)."""
        if self.tp is not None:
            self.tp.kv.unpack(buf, block_ids, layer_start)
            return
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        ops.unpack_kv(buf, self.kv_cache, idx, layer_start)

    def _prompt_logprobs(self, hidden: torch.Tensor, inp: StepInputs,
                         scheduled: list[ScheduledSeq]) -> PromptLogprobs:
        """The model's log-probabilities (no sampling adjustments) of each
        asked-for prompt token given the tokens before it, with the top
        alternatives; the vocabulary projection runs a slice of rows at a
        time so a long chunk never holds [T, V] logits."""
        rows = torch.tensor(inp.prompt_rows, dtype=torch.int64, device=hidden.device)
        targets = torch.tensor(inp.prompt_targets, dtype=torch.int64, device=hidden.device)
        out: PromptLogprobs = {}
        for a in range(0, len(inp.prompt_rows), PROMPT_LOGPROB_ROWS):
            owners = inp.prompt_owners[a:a + PROMPT_LOGPROB_ROWS]
            ns = [scheduled[i].seq.params.prompt_logprobs for i, _ in owners]
            lp = self.model.compute_logits(
                hidden.index_select(0, rows[a:a + PROMPT_LOGPROB_ROWS])).float().log_softmax(-1)
            tgt = targets[a:a + PROMPT_LOGPROB_ROWS]
            chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
            top_ids: list[list[int]] = [[] for _ in owners]
            top_vals: list[list[float]] = [[] for _ in owners]
            if max(ns) > 0:
                top = lp.topk(min(max(ns), lp.shape[1]), dim=-1)
                top_ids, top_vals = top.indices.tolist(), top.values.tolist()
            for j, ((i, p), n, t) in enumerate(zip(owners, ns, tgt.tolist())):
                alts = list(zip(top_ids[j][:n], top_vals[j][:n]))
                out.setdefault(i, []).append((p, TokenLogprobs(t, chosen[j], alts)))
        return out
