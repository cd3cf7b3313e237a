"""MiMo-V2-Flash (``MiMoV2FlashForCausalLM``): the mixture-of-experts decoder
of ``splitserve.engine.models.moe`` (GLM-4.5's grouped sigmoid router with its
correction bias, no shared experts, dense layers by ``mlp_layer_types``) with
transformers' ``MiMoV2FlashAttention`` and a RoPE base per layer type
(``LayerRopeThetas``), all from ``ModelConfig``
(``splitserve.engine.dialects.mimo_v2_flash``).

The attention of each layer: q/k/v projections (queries and keys of
``head_dim`` D, values of ``v_head_dim`` Dv, multiplied by
``attention_value_scale``), RoPE on each head's first ``rotary_dim`` dims,
scores scaled by D ** -0.5; the sliding layers have twice the full layers' KV
heads and a learned sink per query head that joins its softmax's denominator.

The cache has one head count Hk (the sliding layers') and width D for all
layers: the values are zero-padded to D (their zero dims give zero output
columns, dropped before o_proj), and each KV head of a full layer repeated
twice, so that query head h still meets the KV head transformers gives it
(h // (Hq / its own KV heads)). The prefix cache and the KV hand-off carry
it like any other cache.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.granite_swa import LayerRopeThetas
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.rope import apply_rotary
from splitserve.kernels.lora import LoraMeta

_SINK_NAMES = (".self_attn.attention_sink_bias", ".self_attn.sinks")  # the hub's name, transformers'


class MiMoV2Attention(nn.Module):
    """One layer's attention (``self_attn.q_proj``...): a sliding layer
    (``sliding_window`` > 0) has twice the KV heads and the sinks."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "self_attn"):
        super().__init__()
        shape = cfg.options.mimo_v2
        self.sliding_window = sliding_window
        self.num_heads, self.head_dim, self.v_head_dim = cfg.num_heads, cfg.head_dim, shape.v_head_dim
        self.num_kv_heads = shape.kv_heads * (2 if sliding_window else 1)
        self.repeats = cfg.num_kv_heads // self.num_kv_heads  # to the cache's KV heads
        self.value_scale = shape.value_scale
        self.scale = self.head_dim ** -0.5
        self.q_size, self.k_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.v_size = self.num_kv_heads * self.v_head_dim
        # q, k and v in one matmul: rows [q | k | v]
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + self.k_size + self.v_size, cfg.attention_bias,
                               dtype, device)
        self.o_proj = Linear(self.num_heads * self.v_head_dim, cfg.hidden_size, False, dtype, device)
        self.sinks = empty_param(self.num_heads, dtype=torch.float32, device=device) if sliding_window else None

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
        lora: LoraMeta | None = None,  # always None: MiMoV2FlashCausalLM refuses adapters
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.k_size, self.v_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
        k = k.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        v = v.reshape(t, self.num_kv_heads, self.v_head_dim) * self.value_scale
        q, k = apply_rotary(positions, q, k, cos_sin_cache)
        if self.repeats > 1:
            k, v = k.repeat_interleave(self.repeats, dim=1), v.repeat_interleave(self.repeats, dim=1)
        v = F.pad(v, (0, self.head_dim - self.v_head_dim)).contiguous()
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale, self.sliding_window,
                                    sinks=self.sinks)  # [T, Hq, D]
        return self.o_proj(out[..., :self.v_head_dim].reshape(t, self.num_heads * self.v_head_dim))

    def quantize_fp8_(self) -> None:
        self.qkv_proj.quantize_fp8_()
        self.o_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        q, k, v = self.q_size, self.k_size, self.v_size
        slots = linear_slots(self.qkv_proj, [(f"{prefix}.q_proj", 0, q), (f"{prefix}.k_proj", q, k),
                                             (f"{prefix}.v_proj", q + k, v)], None)
        slots.update(linear_slots(self.o_proj, [(f"{prefix}.o_proj", 0, self.o_proj.out_features)], None))
        if self.sinks is not None:
            slots[f"{prefix}.sinks"] = ShardSlot(self.sinks)
        return slots


class MiMoV2DecoderLayer(DecoderLayer):
    """The Llama-style layer (norms, residual, MLP or experts) with ``MiMoV2Attention``."""

    attention_class = MiMoV2Attention


class MiMoV2FlashCausalLM(LayerRopeThetas, MappedCausalLM, MoECausalLM):
    """MiMo-V2-Flash: ``MiMoV2DecoderLayer`` in every layer, a RoPE table per layer type."""

    layer_class = MiMoV2DecoderLayer
    lora_refusal = ("LoRA adapters are not supported for MiMoV2FlashForCausalLM (its layers' KV heads "
                    "and value widths differ); serve it with max_loras 0")

    def _skipped(self, name: str) -> bool:
        return super()._skipped(name) or name.startswith("model.mtp.")  # multi-token prediction

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        return ((name.replace(*_SINK_NAMES) if name.endswith(_SINK_NAMES[0]) else name, tensor),)
