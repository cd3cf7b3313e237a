"""Cohere 2 (``Cohere2ForCausalLM``): Cohere's decoder
(``splitserve.engine.models.cohere``) with two kinds of layers.

The sliding-window layers attend to the last ``sliding_window`` tokens
(``ModelConfig.layer_windows``) and rotate q/k in adjacent pairs, as
Cohere's do; the full-attention layers apply no RoPE at all
(``FamilyOptions.nope_layers``), as SmolLM3's NoPE layers
(``splitserve.engine.models.smollm3``). Their q/k rows are reordered at
load like every layer's: unrotated, the reorder leaves q . k unchanged. The
keys cached for such a layer are unrotated, which the prefix cache and the
KV hand-off carry like any other.
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.cohere import CohereCausalLM


class Cohere2CausalLM(CohereCausalLM):
    """Cohere 2: no cos/sin table for its full-attention layers."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self._nope_layers = frozenset(cfg.options.nope_layers)

    def rope_table(self, index: int) -> torch.Tensor | None:
        return None if index in self._nope_layers else self.cos_sin_cache
