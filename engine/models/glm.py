"""GLM (``GlmForCausalLM``): the Llama decoder with a fused MLP projection
and partial, interleaved RoPE.

- Each MLP's gate and up are stored as one ``gate_up_proj`` (rows
  [gate | up]); it is split at load as Phi-3's is (``Phi3CausalLM``).
- RoPE turns only each head's first ``rotary_dim`` dims
  (``partial_rotary_factor``), in adjacent pairs (2i, 2i+1); the rest pass
  through. Reordering those dims of each q/k head's rows at load, even ones
  first then odd (``deinterleave_heads``), makes it the rotate-half
  rotation of the first ``rotary_dim`` dims that the kernels compute, with
  the same scores, as for Helium (``splitserve.engine.models.helium``).
- q/k/v biases per ``attention_bias``; no o_proj or MLP bias
  (``splitserve.engine.dialects.glm``).
LoRA adapters are refused: their q/k rows would need the same reordering.
"""

from __future__ import annotations

from splitserve.engine.models.helium import HeliumCausalLM
from splitserve.engine.models.phi3 import Phi3CausalLM
from splitserve.engine.models.rope import rotary_dim


class GlmCausalLM(HeliumCausalLM, Phi3CausalLM):
    """GLM (``GlmForCausalLM``): q/k rows reordered (Helium's, over the rotated
    dims only), then gate_up_proj split (Phi-3's) at load."""

    def reordered_dims(self) -> int | None:
        return rotary_dim(self.cfg)
