"""HyperCLOVA X SEED (``HyperCLOVAXForCausalLM``): Granite's decoder
(``splitserve.engine.models.granite``: scaled embeddings, residual branches
and attention scores) with the logits multiplied by ``logits_scaling``
(``FamilyOptions.logit_scale``) and, with ``use_post_norm``
(``FamilyOptions.sandwich_norms``), Peri-Layer Normalization.

transformers' HyperCLOVAXDecoderLayer then computes
``x + m * post_norm1(attn(input(x)))``, then
``x + m * post_norm2(mlp(post_attention(x)))`` (``m``:
``residual_multiplier``): Gemma 2's sandwich, four RMSNorms a layer, with
Granite's scale. ``PeriNormDecoderLayer`` computes it; the checkpoint's
names map onto ``Gemma2DecoderLayer``'s norms:

- ``input_layernorm`` -> ``input_layernorm``
- ``post_norm1`` -> ``post_attention_layernorm`` (after attention)
- ``post_attention_layernorm`` -> ``pre_feedforward_layernorm`` (before the MLP)
- ``post_norm2`` -> ``post_feedforward_layernorm`` (after the MLP)

The norms are Llama's RMSNorm. The projections keep Llama's names.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gemma import Gemma2DecoderLayer
from splitserve.engine.models.granite import GraniteCausalLM, GraniteDecoderLayer
from splitserve.engine.models.layers import ShardSlot, norm_slots
from splitserve.kernels.lora import LoraMeta

# HyperCLOVA X checkpoint norm name -> the Gemma2DecoderLayer norm it loads into
_NORMS = {"input_layernorm": "input_layernorm",
          "post_norm1": "post_attention_layernorm",
          "post_attention_layernorm": "pre_feedforward_layernorm",
          "post_norm2": "post_feedforward_layernorm"}


class PeriNormDecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's sandwich layer with each block's normed output scaled by
    ``residual_multiplier`` before it joins the residual stream (the add
    fused into the next norm), its norms read by HyperCLOVA X's names."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = ""):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
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
        h, _ = self.post_attention_layernorm(h)  # post_norm1
        h, residual = self.pre_feedforward_layernorm(h * self.residual_scale, residual)
        h = self.feed_forward(h, lora)
        h, _ = self.post_feedforward_layernorm(h)  # post_norm2
        return h * self.residual_scale, residual

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = {**self.self_attn.weight_slots(f"{prefix}.self_attn"),
                 **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}")}
        for name, attr in _NORMS.items():
            slots.update(norm_slots(f"{prefix}.{name}", getattr(self, attr)))
        return slots


class HyperCLOVAXCausalLM(GraniteCausalLM):
    """HyperCLOVA X: ``PeriNormDecoderLayer`` layers (Granite's without
    ``use_post_norm``), logits multiplied by ``logits_scaling``."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        layer = PeriNormDecoderLayer if self.cfg.options.sandwich_norms else GraniteDecoderLayer
        return layer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        # multiplied by a Python float, as transformers does
        return logits * self.cfg.options.logit_scale
