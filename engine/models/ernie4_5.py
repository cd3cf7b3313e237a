"""ERNIE 4.5 (dense): the Llama decoder with interleaved rotary pairs.

transformers' Ernie 4.5 rotates each head's dims in adjacent pairs (2i,
2i+1) with frequency i (its cos/sin halves repeated pairwise), as Helium
does: each q/k head's rows (weights and, with ``use_bias``, biases) are
reordered at load, even dims first (``HeliumCausalLM``), so the engine's
rotate-half kernels compute the same scores. Everything else is Llama's,
``use_bias`` putting biases on every projection
(``splitserve.engine.dialects.ernie4_5``). LoRA adapters are refused:
their q/k rows would need the same reordering.
"""

from __future__ import annotations

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.helium import HeliumCausalLM
from splitserve.engine.models.lora_layers import LoraStack


class Ernie4_5CausalLM(HeliumCausalLM):
    """ERNIE 4.5 (``Ernie4_5ForCausalLM``): q/k rows reordered at load."""

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for ERNIE 4.5 checkpoints (its q/k "
                              "rows are reordered at load; adapters' would need the same)")
