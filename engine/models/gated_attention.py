"""Gated attention: ``Attention`` with its output, [T, heads * head_dim],
multiplied by ``sigmoid(gate_proj(x))`` of the layer's normed input before
``o_proj`` (AFMoE's ``AfmoeAttention``, MiniCPM5-MoE's
``MiniCPM5MoeAttention``). q/k norms, RoPE and the kernels are the base
class's."""

from __future__ import annotations

import torch

from splitserve.engine.models.layers import Attention, Linear, ShardSlot, linear_slots
from splitserve.engine.quantization import layer_groups


class GatedAttention(Attention):
    """``Attention`` gated per output dim; ``gate_bias``: whether ``gate_proj``
    has a bias (None: as q/k/v, ``attention_bias``)."""

    gate_bias: bool | None = None

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        bias = cfg.attention_bias if self.gate_bias is None else self.gate_bias
        groups = layer_groups(self.quant, [(f"{prefix}.gate_proj.weight", self.q_size)], cfg.hidden_size)
        self.gate_proj = Linear(cfg.hidden_size, self.q_size, bias, dtype, device, fp8_groups=groups)

    def gate_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * torch.sigmoid(self.gate_proj(x))

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        self.gate_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        slots.update(linear_slots(self.gate_proj, [(f"{prefix}.gate_proj", 0, self.q_size)], self.quant))
        return slots
