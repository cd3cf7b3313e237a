"""Granite SWA (``GraniteSWAForCausalLM``): Granite's decoder
(``splitserve.engine.models.granite``) with windows on the layers
``layer_types`` marks (``ModelConfig.layer_windows``), a sink per query
head in every layer's attention (``self_attn.sinks``,
``FamilyOptions.attention_sinks``), and a RoPE base per layer.

``FamilyOptions.layer_rope_thetas`` (config.json ``layer_rope_theta``)
gives each layer's base: ``LayerRopeThetas`` builds one cos/sin table per
distinct non-zero base, the model's RoPE scaling kept, as transformers
builds one rotary embedding per base; a layer of base 0 applies no RoPE.
The keys cached for such a layer are unrotated, which the prefix cache and
the KV hand-off carry like any other. Checkpoint names are Granite's.
"""

from __future__ import annotations

import dataclasses

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.granite import GraniteCausalLM
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.rope import build_cos_sin_cache


class LayerRopeThetas(CausalLM):
    """A cos/sin table per distinct non-zero base of ``layer_rope_thetas``,
    and none for the layers of base 0; every layer rotates with the main
    table when the option is empty. Put it before the family's decoder
    among the bases."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        thetas = cfg.options.layer_rope_thetas
        self._table_of_layer: list[str | None] = []
        names: dict[float, str] = {}
        for theta in thetas:
            if theta and theta not in names:
                names[theta] = f"layer_cos_sin_cache_{len(names)}"
                table = build_cos_sin_cache(dataclasses.replace(cfg, rope_theta=theta), device)
                self.register_buffer(names[theta], table, persistent=False)
            self._table_of_layer.append(names[theta] if theta else None)

    def rope_table(self, index: int) -> torch.Tensor | None:
        if not self._table_of_layer:
            return self.cos_sin_cache
        name = self._table_of_layer[index]
        return None if name is None else getattr(self, name)


class GraniteSwaCausalLM(LayerRopeThetas, GraniteCausalLM):
    """Granite SWA (``GraniteSWAForCausalLM``): Granite with per-layer RoPE bases
    (windows and sinks come with the shared attention)."""
