"""Gemma 3 (text): Gemma 2's decoder with per-head q/k norms and two RoPE bases.

What it shares with Gemma 2 (``splitserve.engine.models.gemma``): (1 + w)
RMSNorms, embeddings scaled by sqrt(hidden_size), a GeGLU MLP, norms after
attention and around the MLP (``Gemma2DecoderLayer``), scores scaled by
``query_pre_attn_scalar ** -0.5``, the output logits soft-capped when
``final_logit_softcapping`` is set. What it adds (``ModelConfig.options``,
``splitserve.engine.family_config``):

- ``q_norm`` / ``k_norm``: (1 + w) RMSNorms over each head's dims before
  RoPE (``Attention`` with ``ModelConfig.qk_norm``; loaded plus one like
  every Gemma norm);
- ``layer_types``: most layers slide a window of ``sliding_window`` tokens
  (``ModelConfig.layer_windows``), every ``sliding_window_pattern``-th one
  attends to the whole context;
- the sliding layers rotate with their own base (``local_rope_theta``:
  ``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``),
  unscaled; the full-attention layers with ``rope_theta`` and any scaling
  (the model's main table, ``ModelConfig.rope_theta`` / ``rope_scaling``).

``attn_logit_softcapping`` is not applied: transformers' Gemma 3 reads it
into its config but its attention never caps the scores.
"""

from __future__ import annotations

import dataclasses

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.gemma import GemmaCausalLM
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.rope import build_cos_sin_cache


def local_rope_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the sliding layers' RoPE: their base, no scaling."""
    return dataclasses.replace(cfg, rope_theta=cfg.options.local_rope_theta, rope_scaling=None)


class LocalRopeLayers(CausalLM):
    """A second cos/sin table, of ``local_rope_config``, for the layers
    ``FamilyOptions.local_rope_layers`` names (Gemma 3's and OLMo 3's sliding
    layers); the others rotate with the main table. Put it before the
    family's decoder among the bases."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.register_buffer("local_cos_sin_cache", build_cos_sin_cache(local_rope_config(cfg), device),
                             persistent=False)
        self._local_layers = frozenset(cfg.options.local_rope_layers)

    def rope_table(self, index: int) -> torch.Tensor:
        return self.local_cos_sin_cache if index in self._local_layers else self.cos_sin_cache


class Gemma3CausalLM(LocalRopeLayers, GemmaCausalLM):
    """Gemma 3 (``Gemma3ForCausalLM``): a second cos/sin table for the sliding layers."""
