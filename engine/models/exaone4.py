"""EXAONE 4: OLMo 2's post-norm decoder with per-head q/k norms, sliding
windows and full-attention layers without RoPE.

- Each layer norms its attention and MLP outputs, none of its inputs
  (``Olmo2DecoderLayer``), with Llama-style RMSNorm rounding.
- q_norm / k_norm: RMSNorm over each head's dims before RoPE (``Attention``
  with ``ModelConfig.qk_norm``, as Qwen3); they split by head across
  tensor-parallel ranks.
- ``layer_types``: the sliding layers attend to the last ``sliding_window``
  tokens (``ModelConfig.layer_windows``); while a window is set the
  full-attention layers apply no RoPE (``FamilyOptions.nope_layers``, as
  SmolLM3's: their keys are cached unrotated).
(``splitserve.engine.dialects.exaone4`` reads all of it from config.json.)
"""

from __future__ import annotations

from splitserve.engine.models.olmo2 import Olmo2CausalLM
from splitserve.engine.models.smollm3 import SmolLM3CausalLM


class Exaone4CausalLM(SmolLM3CausalLM, Olmo2CausalLM):
    """EXAONE 4 (``Exaone4ForCausalLM``): OLMo 2's layers, SmolLM3's NoPE layers."""
