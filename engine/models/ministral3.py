"""Ministral 3 (``Ministral3ForCausalLM``), as transformers' ``modeling_ministral3``
computes it: Mistral's decoder whose queries, once rotated, are multiplied by
``1 + beta * log(1 + floor(position / length))`` (``FamilyOptions.query_position_beta``
/ ``query_position_length``; transformers' ``get_llama_4_attn_scale``). The factor is
computed in float32 from the integer positions and rounded to the model dtype before
the product, as there; keys are cached unscaled. Everything else, names included, is
the shared decoder's.

``Mistral3ForConditionalGeneration``: the text model's tensors are read from under
``language_model.model.`` / ``language_model.lm_head.`` (as transformers saves them)
or ``model.language_model.`` / ``lm_head.``; the vision tower's and projector's are
skipped (the engine takes text only). LoRA adapters are refused there (PEFT names
the wrapper's modules).
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.dialects.ministral3 import WRAPPED
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Attention
from splitserve.engine.models.mapped import MappedCausalLM, renamed

# Mistral3ForConditionalGeneration's prefixes: the text model's -> the shared decoder's
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))
_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


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


class Ministral3CausalLM(MappedCausalLM):
    """The shared decoder with Ministral 3's position-scaled queries in every layer;
    the text part of ``Mistral3ForConditionalGeneration`` renamed at load."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.wrapped = cfg.architecture == WRAPPED
        if self.wrapped:
            self.lora_refusal = (f"LoRA adapters are not supported for {WRAPPED} checkpoints (PEFT "
                                 "names the wrapper's modules); serve Ministral3ForCausalLM for them")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if not self.wrapped:
            return ((name, tensor),)
        if name.startswith(_SKIPPED_PREFIXES):
            return ()
        return ((renamed(name, _TEXT_PREFIXES), tensor),)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return Ministral3DecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")
