"""ERNIE 4.5 (dense): the Llama decoder with interleaved rotary pairs.

transformers' Ernie 4.5 rotates each head's dims in adjacent pairs (2i,
2i+1) with frequency i (its cos/sin halves repeated pairwise), as Helium
does: each q/k head's rows (weights and, with ``use_bias``, biases) are
reordered at load, even dims first (``HeliumCausalLM``), so the engine's
rotate-half kernels compute the same scores. Everything else is Llama's,
``use_bias`` putting biases on every projection
(``splitserve.engine.dialects.ernie4_5``). LoRA adapters' q/k lora_B rows
take the same reordering (``HeliumCausalLM.adapter_rows``).
"""

from __future__ import annotations

from splitserve.engine.models.helium import HeliumCausalLM


class Ernie4_5CausalLM(HeliumCausalLM):
    """ERNIE 4.5 (``Ernie4_5ForCausalLM``): q/k rows reordered at load."""
