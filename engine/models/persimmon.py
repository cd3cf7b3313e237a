"""Persimmon: the dense decoder with LayerNorm, the ungated relu2 MLP
(``dense_h_to_4h`` / ``dense_4h_to_h``), partial RoPE and q/k LayerNorms
(``FamilyOptions`` and ``qk_norm``, from ``splitserve.engine.dialects.persimmon``).

Its q/k norms are LayerNorms over each head's dims with one weight and
bias shared by every head (``Attention``'s per-head norms, built as
LayerNorms for a ``layer_norm`` family); their biases get slots here. The
checkpoint's names are mapped at load: ``self_attn.dense`` -> ``o_proj``,
``q_layernorm`` / ``k_layernorm`` -> ``q_norm`` / ``k_norm``,
``model.final_layernorm`` -> ``model.norm``; the fused
``query_key_value`` holds each head's q, k and v rows together, as
GPT-NeoX's, and is split into q/k/v_proj by head.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.models.gpt_neox import GPTNeoXCausalLM
from splitserve.engine.models.layers import ShardSlot
from splitserve.engine.models.mapped import renamed

_RENAMES = (("model.final_layernorm.", "model.norm."),)
_LAYER_RENAMES = ((".self_attn.dense.", ".self_attn.o_proj."),
                  (".self_attn.q_layernorm.", ".self_attn.q_norm."),
                  (".self_attn.k_layernorm.", ".self_attn.k_norm."))


class PersimmonCausalLM(GPTNeoXCausalLM):
    """Persimmon (``PersimmonForCausalLM``): names mapped and query_key_value
    split at load, the q/k norms' biases loaded."""

    lora_refusal = ("LoRA adapters are not supported for Persimmon checkpoints (its fused "
                    "query_key_value and ungated MLP have no q/k/v_proj or gate_proj to adapt)")

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = super().weight_slots()
        if self.cfg.qk_norm:
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                slots[f"model.layers.{i}.self_attn.q_norm.bias"] = ShardSlot(attn.q_norm.bias)
                slots[f"model.layers.{i}.self_attn.k_norm.bias"] = ShardSlot(attn.k_norm.bias)
        return slots

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = renamed(name, _RENAMES, _LAYER_RENAMES)
        if ".self_attn.query_key_value." in name:
            yield from self.split_qkv(name, tensor)
        else:
            yield name, tensor
