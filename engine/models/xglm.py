"""XGLM: OPT's decoder (pre-norm layers with LayerNorm, the plain ``fc1`` /
``fc2`` MLP, position p read from row p + 2 of a position table) with
scaled token embeddings and a fixed sinusoidal position table
(``FamilyOptions``, from ``splitserve.engine.dialects.xglm``).

The table is not in checkpoints: it is computed here as transformers'
XGLMSinusoidalPositionalEmbedding computes it (float32 sin | cos halves,
``log(10000) / (half - 1)`` frequency steps, a zero column for an odd
width, the ``pad_token_id`` row zeroed) and rounded to the model dtype.
The token embeddings are multiplied by ``sqrt(d_model)`` (``embed_scale``)
(a Python float times the model-dtype rows). Checkpoint names are OPT's without ``decoder.``
(``model.layers.N.self_attn_layer_norm``, ``fc1``...), mapped by
``OPTCausalLM``; ``model.layer_norm`` -> ``model.norm``. Any
``model.embed_positions.*`` buffer an export carries is skipped.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import ShardSlot
from splitserve.engine.models.opt import OPTCausalLM


def sinusoidal_table(rows: int, dim: int, pad_row: int | None) -> torch.Tensor:
    """[rows, dim] float32: XGLMSinusoidalPositionalEmbedding.get_embedding."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    angles = torch.arange(rows, dtype=torch.int64).float().unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(rows, -1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
    if pad_row is not None and 0 <= pad_row < rows:
        table[pad_row, :] = 0
    return table


class ScaledOPTCausalLM(OPTCausalLM):
    """OPT's model with token embeddings multiplied by ``embed_scale``, a
    Python float, as XGLM's and BioGPT's scaled word embeddings multiply
    them (no rounding of the scale to the model dtype first)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.cfg.options.embed_scale


class XGLMCausalLM(ScaledOPTCausalLM):
    """XGLM (``XGLMForCausalLM``): OPT's model with scaled token embeddings
    and the sinusoidal position table built here, not loaded."""

    lora_refusal = ("LoRA adapters are not supported for XGLM checkpoints (its layers' norms and "
                    "MLP are renamed at load; adapters do not map onto them)")

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        rows, dim = self.embed_positions.shape
        with torch.no_grad():
            self.embed_positions.copy_(sinusoidal_table(rows, dim, cfg.options.position_pad_row))

    def weight_slots(self) -> dict[str, ShardSlot]:
        slots = super().weight_slots()
        del slots[f"{self.cfg.options.position_table}.weight"]  # computed, not loaded
        return slots

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.startswith("model.embed_positions."):
            return ()
        if name.startswith("model.layer_norm."):
            return ((name.replace("model.layer_norm.", "model.norm.", 1), tensor),)
        return super().mapped(name, tensor)
