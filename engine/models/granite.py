"""Granite: the Llama decoder with four scalars from config.json
(``ModelConfig.options``, ``splitserve.engine.family_config``):

- ``embedding_multiplier``: embeddings multiplied by it (``embed_scale``);
- ``residual_multiplier``: each attention and MLP output multiplied by it
  before it joins the residual stream (``GraniteDecoderLayer``);
- ``attention_multiplier``: the attention score scale in place of
  head_dim ** -0.5 (``attn_scale``, read by ``Attention``);
- ``logits_scaling``: the output logits divided by it (``logits_divisor``).

Biases follow ``attention_bias`` (q/k/v and o_proj) and ``mlp_bias`` as in Llama.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.llama import CausalLM
from splitserve.kernels.lora import LoraMeta


class GraniteDecoderLayer(DecoderLayer):
    """``DecoderLayer`` with each block's output scaled by
    ``residual_multiplier`` before it is added to the residual stream (the
    add itself stays fused into the next norm)."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "", mlp: nn.Module | None = None, mlp_name: str = "mlp",
                 mixer: nn.Module | None = None, mixer_name: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, mlp=mlp, mlp_name=mlp_name, prefix=prefix,
                         mixer=mixer, mixer_name=mixer_name)
        self.residual_scale = cfg.options.residual_scale

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
        h, residual = self.post_attention_layernorm(h * self.residual_scale, residual)
        h = self.feed_forward(h, lora)
        return h * self.residual_scale, residual


class GraniteCausalLM(CausalLM):
    """Granite (``GraniteForCausalLM``): scaled embeddings, residual
    branches, attention scores and logits."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return GraniteDecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # multiplied by a Python float, as transformers does (no rounding of the factor)
        return super().embed(input_ids) * self.cfg.options.embed_scale

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.cfg.options.logits_divisor
