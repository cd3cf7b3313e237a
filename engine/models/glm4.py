"""GLM-4 (``Glm4ForCausalLM``): GLM (``splitserve.engine.models.glm``) with a
norm on each block's output.

transformers' Glm4DecoderLayer computes
``x + post_self_attn(attn(input(x)))``, then
``x + post_mlp(mlp(post_attention(x)))``: Gemma 2's sandwich, four RMSNorms
a layer, under other names. ``Gemma2DecoderLayer`` computes it; the
checkpoint's names map onto its norms:

- ``input_layernorm`` -> ``input_layernorm``
- ``post_self_attn_layernorm`` -> ``post_attention_layernorm`` (after attention)
- ``post_attention_layernorm`` -> ``pre_feedforward_layernorm`` (before the MLP)
- ``post_mlp_layernorm`` -> ``post_feedforward_layernorm`` (after the MLP)

The norms are Llama's RMSNorm (the weight times the normed row rounded to
the model dtype). Everything else (fused gate_up_proj split at load, the
rotated part of each q/k head reordered for the interleaved pairs, LoRA
refused) is GLM's.
"""

from __future__ import annotations

import torch

from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gemma import Gemma2DecoderLayer
from splitserve.engine.models.glm import GlmCausalLM
from splitserve.engine.models.layers import ShardSlot, norm_slots

# GLM-4 checkpoint norm name -> the Gemma2DecoderLayer norm it loads into
_NORMS = {"input_layernorm": "input_layernorm",
          "post_self_attn_layernorm": "post_attention_layernorm",
          "post_attention_layernorm": "pre_feedforward_layernorm",
          "post_mlp_layernorm": "post_feedforward_layernorm"}


class Glm4DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's sandwich layer, its norms read by GLM-4's checkpoint names."""

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = {**self.self_attn.weight_slots(f"{prefix}.self_attn"),
                 **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}")}
        for name, attr in _NORMS.items():
            slots.update(norm_slots(f"{prefix}.{name}", getattr(self, attr)))
        return slots


class Glm4CausalLM(GlmCausalLM):
    """GLM-4: ``Glm4DecoderLayer`` layers, loaded as GLM's."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return Glm4DecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")
