"""CUDA graphs for decode steps: one graph per bucketed batch size.

Decode steps (every sequence one new token) are small and launch-bound on
GPUs; replaying a captured graph removes the per-kernel launch cost. Graphs
are captured largest bucket first and share one memory pool; a step is
padded up to the smallest bucket that holds it (padding rows store nothing:
slot -1, context length 0). Steps larger than the largest bucket, and any
step that is not decode-only, run eagerly.

With LoRA slots, every graph also reads static adapter metadata
(``LoraMeta``: each row's slot, rows grouped by slot), copied in per step;
a step without adapters runs the same graph with every row at slot -1
(the LoRA kernels' programs then exit at once).
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.kernels.lora import LoraMeta

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class CudaGraphRunner:
    def __init__(self, model, kv_cache: torch.Tensor, max_batch: int, max_blocks_per_seq: int,
                 k_scale: float = 1.0, v_scale: float = 1.0,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, lora_slots: int = 0):
        if kv_cache.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and KV cache on a CUDA device")
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = tuple(sorted(b for b in buckets if b <= max_batch)) or (max_batch,)
        dev = kv_cache.device
        n = self.buckets[-1]
        # static inputs every graph reads; steps copy into their first rows
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cu_query_lens = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.k_scale, self.v_scale = k_scale, v_scale
        self.lora_slots = lora_slots
        if lora_slots:
            i32 = dict(dtype=torch.int32, device=dev)
            self.token_slots = torch.full((n,), -1, **i32)
            self.sorted_tokens = torch.arange(n, **i32)
            self.seg_start = torch.zeros(lora_slots, **i32)
            self.seg_len = torch.zeros(lora_slots, **i32)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            cu_query_lens=self.cu_query_lens[: b + 1], context_lens=self.context_lens[:b],
            decode_only=True, k_scale=self.k_scale, v_scale=self.v_scale)

    def _lora(self, b: int) -> dict:
        """The model's ``lora`` argument for bucket ``b`` (the static buffers)."""
        if not self.lora_slots:
            return {}
        return {"lora": LoraMeta(self.token_slots[:b], self.sorted_tokens[:b], self.seg_start,
                                 self.seg_len)}

    def _copy_lora(self, lora: LoraMeta | None, batch: int, bucket: int) -> None:
        if not self.lora_slots:
            return
        if lora is None:  # no adapter in this step
            self.token_slots[:bucket].fill_(-1)
            self.seg_len.zero_()
            return
        self.token_slots[:batch].copy_(lora.token_slots)
        self.token_slots[batch:bucket].fill_(-1)
        self.sorted_tokens[:batch].copy_(lora.sorted_tokens)  # segments never reach padding rows
        self.seg_start.copy_(lora.seg_start)
        self.seg_len.copy_(lora.seg_len)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first: later graphs reuse its pool
            meta = self._meta(b)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (autotuning, lazy init) off-graph
                self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, meta,
                           **self._lora(b))
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, meta,
                                 **self._lora(b))
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata, lora: LoraMeta | None = None) -> torch.Tensor | None:
        """Replay the graph for this decode step; None if it must run eagerly.
        ``lora``: the step's adapters (None: none)."""
        batch = input_ids.shape[0]
        bucket = self.bucket_for(batch) if meta.decode_only else None
        width = meta.block_tables.shape[1]
        if bucket is None or bucket not in self.graphs or width > self.block_tables.shape[1]:
            return None
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:bucket].fill_(-1)
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.context_lens[:batch].copy_(meta.context_lens)
        self.context_lens[batch:bucket].zero_()
        self._copy_lora(lora, batch, bucket)
        graph, out = self.graphs[bucket]
        graph.replay()
        self.replays += 1
        return out[:batch]
