"""Ministral 3 (``Ministral3ForCausalLM``), as transformers' ``modeling_ministral3``
computes it: Mistral's decoder whose queries, once rotated, are multiplied by
``1 + beta * log(1 + floor(position / length))`` (``FamilyOptions.query_position_beta``
/ ``query_position_length``; transformers' ``get_llama_4_attn_scale``). The factor is
computed in float32 from the integer positions and rounded to the model dtype before
the product, as there; keys are cached unscaled. Everything else, names included, is
the shared decoder's.
"""

from __future__ import annotations

import torch

from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Attention
from splitserve.engine.models.llama import CausalLM


class Ministral3Attention(Attention):
    """Attention whose rotated queries are scaled by their position (Llama 4's form)."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        self.beta, self.length = cfg.options.query_position_beta, cfg.options.query_position_length

    def position_qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin_cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale = 1 + self.beta * torch.log(1 + torch.floor(positions / self.length))  # [T] float32
        return q * scale.to(q.dtype)[:, None, None], k


class Ministral3DecoderLayer(DecoderLayer):
    attention_class = Ministral3Attention


class Ministral3CausalLM(CausalLM):
    """The shared decoder with Ministral 3's position-scaled queries in every layer."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return Ministral3DecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")
