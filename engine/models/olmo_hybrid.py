"""OLMo Hybrid (``OlmoHybridForCausalLM``): Gated DeltaNet layers
(``splitserve.engine.models.gated_delta_net``) beside OLMo 3's attention
layers, as transformers' ``modeling_olmo_hybrid`` computes them.

- Gated DeltaNet layers: pre-norm (``attention_layer_norm`` before the mixer,
  ``feedforward_layer_norm`` before the MLP, as the checkpoints name
  transformers' input_layernorm / post_attention_layernorm); the mixer's q,
  k, v, gate, b, a and output projections stored apart (``q_proj`` ...
  ``g_proj``, ``o_proj``), its output norm ``o_norm``; beta doubled
  (``GatedDeltaNetShape.beta_scale``). The one depthwise convolution is
  stored as ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d``, concatenated at load
  as transformers concatenates them (whatever rows each holds: transformers
  saves three equal thirds).
- Attention layers: OLMo 2's post-norm layer (``Olmo2DecoderLayer``: the
  attention output normed by ``feedforward_layer_norm``, the MLP's by
  ``post_feedforward_layernorm``), q/k normed over all heads, RoPE on
  float32 copies of q and k, or none (NoPE: ``FamilyOptions.nope_layers``).

The two layer kinds pass the stream the same way (a layer's output and the
residual apart, summed by the next norm), so they chain as they are.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gated_delta_net import GatedDeltaNet
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import Attention, ShardSlot, linear_slots
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.olmo2 import Olmo2DecoderLayer

# transformers' names -> the checkpoints' (its conversion mapping for olmo_hybrid)
_NORM_NAMES = ((".input_layernorm.", ".attention_layer_norm."),
               (".post_attention_layernorm.", ".feedforward_layer_norm."))
_CONV_PARTS = ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")
# the Gated DeltaNet's projections -> their checkpoint (and LoRA module) names
_LORA_NAMES = {"in_proj_z": "g_proj", "in_proj_b": "b_proj", "in_proj_a": "a_proj", "out_proj": "o_proj"}


class OlmoHybridGatedDeltaNet(GatedDeltaNet):
    """The Gated DeltaNet under OLMo Hybrid's checkpoint names (LoRA
    adapters' too: q/k/v as three slices of ``in_proj_qkv``'s stack)."""

    def lora_parts(self, name: str) -> list[tuple[str, int]]:
        s = self.shape
        if name == "in_proj_qkv":
            return [("q_proj", s.key_dim), ("k_proj", s.key_dim), ("v_proj", s.value_dim)]
        return [(_LORA_NAMES[name], getattr(self, name).out_features)]

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        s = self.shape
        k, v = s.key_dim, s.value_dim
        slots = linear_slots(self.in_proj_qkv, [(f"{prefix}.q_proj", 0, k), (f"{prefix}.k_proj", k, k),
                                                (f"{prefix}.v_proj", 2 * k, v)], None)
        for name, lin in (("g_proj", self.in_proj_z), ("b_proj", self.in_proj_b), ("a_proj", self.in_proj_a),
                          ("o_proj", self.out_proj)):
            slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        slots[f"{prefix}.conv1d.weight"] = ShardSlot(self.conv_weight)
        slots[f"{prefix}.dt_bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.o_norm.weight"] = ShardSlot(self.norm_weight)
        return slots


class FloatRopeAttention(Attention):
    float_rope = True  # OlmoHybridRotaryEmbedding's float32 cos/sin promote q and k


class OlmoHybridAttentionLayer(Olmo2DecoderLayer):
    attention_class = FloatRopeAttention


class OlmoHybridCausalLM(MappedCausalLM, HybridCausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self._conv_parts: dict[str, dict[str, torch.Tensor]] = {}  # a layer's convolution pieces so far

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """q_conv1d / k_conv1d / v_conv1d -> one conv1d.weight once all three are read."""
        part = next((p for p in _CONV_PARTS if name.endswith(f".linear_attn.{p}")), None)
        if part is None:
            return ((name, tensor),)
        base = name[:-len(part)]
        parts = self._conv_parts.setdefault(base, {})
        parts[part] = tensor
        if len(parts) < len(_CONV_PARTS):
            return ()
        del self._conv_parts[base]
        return ((f"{base}conv1d.weight", torch.cat([parts[p] for p in _CONV_PARTS])),)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout = cfg.options.hybrid
        if layout.layer_kinds[index] == ATTENTION:
            return OlmoHybridAttentionLayer(cfg, dtype, device, window, prefix=prefix)
        return DecoderLayer(cfg, dtype, device, window, prefix=prefix, mixer_name="linear_attn",
                            mixer=OlmoHybridGatedDeltaNet(cfg, dtype, device, layout.state_index(index)))

    def rope_table(self, index: int) -> torch.Tensor | None:
        return None if index in self.cfg.options.nope_layers else self.cos_sin_cache

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = {}
        for name, slot in super().weight_slots().items():
            for old, new in _NORM_NAMES:
                name = name.replace(old, new)
            slots[name] = slot
        return slots
