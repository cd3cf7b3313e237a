"""OLMo 2: the Llama decoder with its norms moved after the blocks.

- No norm before attention or the MLP: ``post_attention_layernorm`` norms
  the attention output and ``post_feedforward_layernorm`` the MLP output,
  each before its residual add (``Olmo2DecoderLayer``); the final
  ``model.norm`` stays.
- q_norm / k_norm: RMSNorm over a token's whole q (all query heads) and k
  (all KV heads), before the head split and RoPE (``Attention`` with
  ``FamilyOptions.full_qk_norm``). Such a norm spans every rank's heads:
  under tensor parallelism each rank norms its heads' slice with the sum
  of squares all-reduced over the ranks
  (``splitserve.engine.parallel.qk_norm``).
- Biases follow ``attention_bias`` (q/k/v and o_proj); the MLP has none.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import ShardSlot, model_norm
from splitserve.engine.models.llama import CausalLM
from splitserve.kernels.lora import LoraMeta


class Olmo2DecoderLayer(DecoderLayer):
    """``residual + post_attn(attn(residual))``, then
    ``residual + post_ff(mlp(residual))``. The layer returns the normed MLP
    output and the stream apart; the next layer (or the final norm) adds them."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "", **mlp):
        # mlp: DecoderLayer's mlp / mlp_name (FlexOlmo's experts)
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix, **mlp)
        self.input_layernorm = None  # OLMo 2 has no pre-attention norm
        self.post_feedforward_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)

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
        residual = x if residual is None else x + residual
        h = self.self_attn(positions, residual, layer_cache, meta, cos_sin_cache, lora)
        if self.tp is not None:  # row-parallel o_proj: summed before the norm
            h = self.tp.all_reduce(h)
        h, _ = self.post_attention_layernorm(h)
        residual = residual + h
        h, _ = self.post_feedforward_layernorm(self.feed_forward(residual, lora))
        return h, residual

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {
            f"{prefix}.post_attention_layernorm.weight": ShardSlot(self.post_attention_layernorm.weight),
            f"{prefix}.post_feedforward_layernorm.weight": ShardSlot(self.post_feedforward_layernorm.weight),
            **self.self_attn.weight_slots(f"{prefix}.self_attn"),
            **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}"),
        }


class Olmo2CausalLM(CausalLM):
    """OLMo 2 (``Olmo2ForCausalLM``): ``Olmo2DecoderLayer`` layers."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return Olmo2DecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")
