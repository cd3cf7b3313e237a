"""Jais 2 (``Jais2ForCausalLM``): the Llama decoder with LayerNorms (weight
and bias) in place of RMSNorms and an ungated MLP, ``PlainMLP``
(``up_proj -> relu2 -> down_proj``); ``FamilyOptions`` from
``splitserve.engine.dialects.jais2``. Everything else, tensor names
included, is Llama's. LoRA adapters are refused: the MLP has no gate_proj
and takes none. LayerNorm layers are not split across tensor-parallel ranks
(``splitserve.engine.parallel.plan.check``).
"""

from __future__ import annotations

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.lora_layers import LoraStack


class Jais2CausalLM(CausalLM):
    """Jais 2: ``CausalLM`` with LayerNorm and ``PlainMLP`` layers (``build_layer``
    picks them from ``FamilyOptions``)."""

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for Jais2ForCausalLM checkpoints "
                              "(its ungated MLP takes none)")
