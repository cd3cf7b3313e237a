"""Liquid LFM3 (``Lfm3ForCausalLM``): LFM2 (``splitserve.engine.models.lfm2``)
with Qwen3's attention (``q_norm`` / ``k_norm``, ``o_proj``), full and
sliding-window attention layers each rotating with its layer type's RoPE
(in float32; the full layers' proportional RoPE turns part of each head),
each head's output optionally gated by sigmoid(``g_proj``) of the layer
input (``Lfm2Shape.attention_gate``), and with ``sandwich_norms`` the
mixer's and the MLP's outputs normed again before the residual add
(Gemma 2's layer: ``post_operator_norm`` -> ``post_attention_layernorm``,
``ffn_norm`` -> ``pre_feedforward_layernorm``, ``post_ffn_norm`` ->
``post_feedforward_layernorm`` at load; without them ``ffn_norm`` ->
``post_attention_layernorm`` as in LFM2).
"""

from __future__ import annotations

import torch

from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gemma import Gemma2DecoderLayer
from splitserve.engine.models.gemma4 import layer_rope_table
from splitserve.engine.models.layers import Attention, Linear, ShardSlot, linear_slots
from splitserve.engine.models.lfm2 import DENSE_MLP, NORMS_AND_ATTENTION, Lfm2ForCausalLM

# the gate's name in transformers' model (checkpoints write gate_proj)
_GATE = ((".self_attn.g_proj.", ".self_attn.gate_proj."),)
_SANDWICH_RENAMES = (*NORMS_AND_ATTENTION, *_GATE, (".post_operator_norm.", ".post_attention_layernorm."),
                     (".ffn_norm.", ".pre_feedforward_layernorm."),
                     (".post_ffn_norm.", ".post_feedforward_layernorm."), *DENSE_MLP)
_PLAIN_RENAMES = (*NORMS_AND_ATTENTION, *_GATE, (".ffn_norm.", ".post_attention_layernorm."), *DENSE_MLP)


class Lfm3Attention(Attention):
    """Qwen3's attention, RoPE in float32, each head's output times
    sigmoid(``g_proj(x)``) where the config gates it."""

    float_rope = True

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        self.g_proj = (Linear(cfg.hidden_size, self.num_heads, False, dtype, device)
                       if cfg.options.lfm2.attention_gate else None)

    def gate_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.g_proj is None:
            return out
        t = out.shape[0]
        gate = torch.sigmoid(self.g_proj(x))[:, :, None]  # [T, heads, 1]
        return (out.view(t, self.num_heads, self.head_dim) * gate).view(t, self.q_size)

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        if self.g_proj is not None:
            self.g_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        if self.g_proj is not None:
            slots.update(linear_slots(self.g_proj, [(f"{prefix}.gate_proj", 0, self.num_heads)], None))
        return slots


class Lfm3DecoderLayer(DecoderLayer):
    attention_class = Lfm3Attention


class Lfm3SandwichLayer(Gemma2DecoderLayer):
    attention_class = Lfm3Attention


class Lfm3ForCausalLM(Lfm2ForCausalLM):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        ropes = cfg.options.lfm2.ropes
        kinds = sorted({r for r in ropes if r is not None}, key=ropes.index)
        for j, rope in enumerate(kinds):
            self.register_buffer(f"rope_table_{j}", layer_rope_table(rope, cfg.max_position).to(device),
                                 persistent=False)
        self._table_of = [None if r is None else kinds.index(r) for r in ropes]

    @property
    def layer_class(self) -> type[DecoderLayer]:
        return Lfm3SandwichLayer if self.cfg.options.sandwich_norms else Lfm3DecoderLayer

    @property
    def renames(self) -> tuple[tuple[str, str], ...]:
        return _SANDWICH_RENAMES if self.cfg.options.sandwich_norms else _PLAIN_RENAMES

    def rope_table(self, index: int) -> torch.Tensor | None:
        j = self._table_of[index]
        return None if j is None else getattr(self, f"rope_table_{j}")
