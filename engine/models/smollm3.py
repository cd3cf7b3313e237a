"""SmolLM3: the Llama decoder with RoPE left out of some layers ("NoPE").

``no_rope_layers`` in config.json holds one flag per layer, 0 where the
layer's attention applies no rotary embedding at all (by default every
fourth layer; ``FamilyOptions.nope_layers``,
``splitserve.engine.family_config``). The keys cached for such a layer are
unrotated, which the prefix cache and the KV hand-off carry like any other.
Everything else is Llama's: biases follow ``attention_bias`` (q/k/v and
o_proj) and ``mlp_bias``, embeddings tied by default, a window (on the
layers ``layer_types`` marks) only with ``use_sliding_window``.
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.llama import CausalLM


class SmolLM3CausalLM(CausalLM):
    """SmolLM3 (``SmolLM3ForCausalLM``): no cos/sin table for its NoPE layers."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self._nope_layers = frozenset(cfg.options.nope_layers)

    def rope_table(self, index: int) -> torch.Tensor | None:
        return None if index in self._nope_layers else self.cos_sin_cache
