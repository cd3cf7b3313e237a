"""Nemotron (``NemotronForCausalLM``): the dense decoder with LayerNorm1P,
the ungated MLP and partial RoPE (``FamilyOptions`` from
``splitserve.engine.dialects.nemotron``).

transformers' NemotronLayerNorm1P is a LayerNorm (weight and bias) whose
weight is applied as ``1 + weight``, summed in the weight's dtype, and
computed in the input's dtype (no float32 cast). Here each norm weight is
loaded as ``1 + weight``, summed in the model dtype (``PlusOneSlot``), and
the norms are ``layers.LayerNorm``. The MLP is ``PlainMLP`` (``up_proj ->
relu2 -> down_proj``); the first ``rotary_dim`` dims of each head rotate,
rotate-half, the rest pass through. LoRA adapters take the attention
projections and the MLP's up_proj / down_proj. Tensor-parallel ranks each
hold every norm whole (loaded plus one on each) and their part of the
heads and of the MLP (``splitserve.engine.parallel.sharding``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.models.layers import ShardSlot
from splitserve.engine.models.llama import CausalLM


@dataclass(frozen=True)
class PlusOneSlot(ShardSlot):
    """A LayerNorm1P weight: stored as ``1 + weight``, in the parameter's dtype."""

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point():
            tensor = tensor.to(self.param.dtype) + 1.0
        super().load(name, tensor)


class NemotronCausalLM(CausalLM):
    """Nemotron: every norm weight loaded plus one."""

    def weight_slots(self) -> dict[str, ShardSlot]:
        return {name: PlusOneSlot(slot.param, slot.start, slot.size) if name.endswith("norm.weight") else slot
                for name, slot in super().weight_slots().items()}

