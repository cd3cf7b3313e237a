"""Gemma and Gemma 2: the Llama-style decoder with Gemma's differences.

Both (``ModelConfig.options``, ``splitserve.engine.family_config``):
- RMSNorm scales by ``1 + weight``: the checkpoint's norm weights are
  loaded plus one (``NormPlusOneSlot``) into float32 parameters
  (``layers.model_norm``), and the norm multiplies them into the float32
  normed row, rounding the product once (``FamilyOptions.norm_fp32_product``),
  as transformers' Gemma RMSNorm does;
- embeddings are scaled by sqrt(hidden_size), rounded to the model dtype as
  transformers rounds it;
- a GeGLU MLP (tanh-approximated GELU), ``MLP`` with ``hidden_act``;
- ``head_dim`` set apart from hidden_size / heads, embeddings tied.

Gemma 2 adds (``Gemma2DecoderLayer``) a norm after attention and norms
before and after the MLP; attention scores scaled by
``query_pre_attn_scalar ** -0.5`` and soft-capped (``Attention.softcap``,
applied inside the attention kernels); the output logits soft-capped in
``scale_logits`` (in the model dtype); a sliding window on every other layer
(``ModelConfig.layer_windows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import ShardSlot, model_norm
from splitserve.engine.models.llama import CausalLM
from splitserve.kernels.lora import LoraMeta


@dataclass(frozen=True)
class NormPlusOneSlot(ShardSlot):
    """A Gemma norm weight: stored as ``1 + weight`` (summed in float32)."""

    def load(self, name: str, tensor: torch.Tensor) -> None:
        super().load(name, tensor.float() + 1.0 if tensor.is_floating_point() else tensor)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap), each step
    rounded to x's dtype as transformers rounds it."""
    return torch.tanh(x / cap) * cap


class Gemma2DecoderLayer(DecoderLayer):
    """Attention and MLP each between two norms (Gemma 2's "sandwich"):
    ``x + post_attn(attn(in(x)))``, then ``x + post_ff(mlp(pre_ff(x)))``.
    The residual add is fused into the next norm, as in ``DecoderLayer``."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "", **mlp):
        # mlp: DecoderLayer's mlp / mlp_name (Kolibri's experts)
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix, **mlp)
        norm = lambda: model_norm(cfg, cfg.hidden_size, dtype, device)  # noqa: E731
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # [T, hidden]; None before layer 0
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,
        lora: LoraMeta | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.attend(positions, x, residual, layer_cache, meta, cos_sin_cache, lora)
        h, _ = self.post_attention_layernorm(h)  # normed before it joins the stream
        h, residual = self.pre_feedforward_layernorm(h, residual)
        h = self.feed_forward(h, lora)
        h, _ = self.post_feedforward_layernorm(h)
        return h, residual

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        slots[f"{prefix}.pre_feedforward_layernorm.weight"] = ShardSlot(self.pre_feedforward_layernorm.weight)
        slots[f"{prefix}.post_feedforward_layernorm.weight"] = ShardSlot(self.post_feedforward_layernorm.weight)
        return slots


class GemmaCausalLM(CausalLM):
    """Gemma (``DecoderLayer``) and Gemma 2 (``Gemma2DecoderLayer``)."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        if self.cfg.options.sandwich_norms:
            return Gemma2DecoderLayer(self.cfg, dtype, device, window, prefix=prefix)
        return DecoderLayer(self.cfg, dtype, device, window, prefix=prefix)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        return x * torch.tensor(self.cfg.options.embed_scale, dtype=x.dtype, device=x.device)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.options.final_softcap
        return logits if cap <= 0 else soft_cap(logits, cap)

    def weight_slots(self) -> dict[str, ShardSlot]:
        return {name: NormPlusOneSlot(slot.param, slot.start, slot.size) if _is_norm(name) else slot
                for name, slot in super().weight_slots().items()}


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")
