"""Arcee (``ArceeForCausalLM``): the Llama decoder whose MLP is ungated,
``PlainMLP`` (``up_proj -> relu2 -> down_proj``; ``FamilyOptions`` from
``splitserve.engine.dialects.arcee``). Everything else, tensor names
included, is Llama's. LoRA adapters are refused: the MLP has no gate_proj
and takes none.
"""

from __future__ import annotations

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.lora_layers import LoraStack


class ArceeCausalLM(CausalLM):
    """Arcee: ``CausalLM`` with ``PlainMLP`` layers (``build_layer`` picks it)."""

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for Arcee checkpoints (its "
                              "ungated MLP takes none)")
