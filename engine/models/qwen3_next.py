"""Qwen3-Next (``Qwen3NextForCausalLM``): a hybrid of Gated DeltaNet layers
(``splitserve.engine.models.gated_delta_net``) and gated attention layers,
each followed by Qwen2-MoE's sparse MLP (softmax top-k, a sigmoid-gated
shared expert) or, in ``mlp_only_layers``, a dense one.

The attention layers: ``q_proj`` gives each head's query and an output
gate side by side ([heads, 2 x head_dim]); q and k are RMS-normed per head
(scaled by 1 + weight, as every norm of the family) before a partial RoPE
(``partial_rotary_factor``, 0.25 by default); the attention output is
multiplied by sigmoid(gate) before ``o_proj``. A LoRA adapter's q_proj
delta covers q_proj's whole output, query and gate rows, as PEFT adds it.
LoRA adapters are taken on the attention projections, the dense MLPs
(not the experts, routers or shared experts) and the Gated DeltaNet's
projections.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gated_delta_net import GatedDeltaNet
from splitserve.engine.models.gemma import NormPlusOneSlot
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import Attention, Linear, ShardSlot, linear_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import CHECKPOINT_NAMES, MoECausalLM
from splitserve.engine.models.rope import apply_rotary
from splitserve.kernels.lora import LoraMeta


class OutputGatedAttention(Attention):
    """Attention whose ``q_proj`` rows hold, per head, the query then a gate
    of the same width; the output is gated by sigmoid(gate) per dim."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        self.qkv_proj = Linear(cfg.hidden_size, 2 * self.q_size + 2 * self.kv_size, cfg.attention_bias,
                               dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
                lora: LoraMeta | None = None) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qgkv = self.qkv_proj(x)
        if lora is not None and self.qkv_lora is not None:  # on q_proj's whole [query | gate] rows
            self.qkv_lora.add_to(qgkv, x, lora)
        qg, k, v = qgkv.split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
        qg = qg.view(t, self.num_heads, 2 * d)
        q, gate = qg[..., :d].contiguous(), qg[..., d:].reshape(t, self.q_size)
        k = k.reshape(t, self.num_kv_heads, d).contiguous()
        v = v.reshape(t, self.num_kv_heads, d).contiguous()
        q, k = self.norm_qk(q, k)
        if cos_sin_cache is not None:
            q, k = apply_rotary(positions, q, k, cos_sin_cache, self.float_rope)
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale, self.sliding_window,
                                    self.softcap)
        out = out.reshape(t, self.q_size) * torch.sigmoid(gate)
        y = self.o_proj(out)
        if lora is not None and self.o_lora is not None:
            self.o_lora.add_to(y, out, lora)
        return y

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """As ``Attention.enable_lora``, q_proj's slice as wide as its query and gate rows."""
        dev = self.o_proj.weight.device
        self.qkv_lora = LoraStack(self.qkv_proj.in_features, (2 * self.q_size, self.kv_size, self.kv_size),
                                  num_slots, max_rank, self.dtype, dev)
        self.o_lora = LoraStack(self.q_size, (self.o_proj.out_features,), num_slots, max_rank,
                                self.dtype, dev)
        q, o = self.qkv_lora, self.o_lora
        return {"q_proj": (q, 0), "k_proj": (q, 1), "v_proj": (q, 2), "o_proj": (o, 0)}

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        q, kv = 2 * self.q_size, self.kv_size
        slots = linear_slots(self.qkv_proj, [(f"{prefix}.q_proj", 0, q), (f"{prefix}.k_proj", q, kv),
                                             (f"{prefix}.v_proj", q + kv, kv)], None)
        slots.update(linear_slots(self.o_proj, [(f"{prefix}.o_proj", 0, self.o_proj.out_features)], None))
        slots[f"{prefix}.q_norm.weight"] = ShardSlot(self.q_norm.weight)
        slots[f"{prefix}.k_norm.weight"] = ShardSlot(self.k_norm.weight)
        return slots


class GatedAttentionLayer(DecoderLayer):
    attention_class = OutputGatedAttention


class Qwen3NextForCausalLM(HybridCausalLM, MoECausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout = cfg.options.hybrid
        kwargs = {}
        if layout.layer_kinds[index] != ATTENTION:
            kwargs = {"mixer": GatedDeltaNet(cfg, dtype, device, layout.state_index(index)),
                      "mixer_name": "linear_attn"}
        if cfg.moe is not None and cfg.moe.sparse_layers[index]:
            name = CHECKPOINT_NAMES[cfg.family][0]
            kwargs.update(mlp_name=name, mlp=self.moe_block_class(cfg, dtype, device, prefix=f"{prefix}.{name}"))
        return GatedAttentionLayer(cfg, dtype, device, window, prefix=prefix, **kwargs)

    def weight_slots(self) -> dict[str, ShardSlot]:
        """Every RMSNorm weight loaded plus one (float32), but the Gated DeltaNet's
        output norm, which scales by its weight as it is."""
        return {name: NormPlusOneSlot(slot.param, slot.start, slot.size)
                if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight") else slot
                for name, slot in super().weight_slots().items()}
