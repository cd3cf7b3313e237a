"""Google RecurrentGemma (``RecurrentGemmaForCausalLM``, Griffin): a hybrid
of recurrent blocks (``splitserve.engine.models.rg_lru``, their states per
sequence) and local multi-query attention layers (a sliding window,
``ModelConfig.layer_windows``; partial rotary), each followed by a GeGLU
MLP with biases; Gemma's norms (1 + weight), embedding scale and logit
soft-cap (``GemmaCausalLM``).

Its checkpoints name things their own way; they are renamed at load onto
the shared decoder's slots: ``temporal_pre_norm`` -> ``input_layernorm``,
``channel_pre_norm`` -> ``post_attention_layernorm``, ``mlp_block`` ->
``mlp``, the attention layers' ``temporal_block`` -> ``self_attn``,
``model.final_norm`` -> ``model.norm``. The recurrent layers keep theirs
(``temporal_block.linear_x`` ...).
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.gemma import GemmaCausalLM
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.models.rg_lru import RecurrentBlock

PREFIXES = (("model.final_norm.", "model.norm."),)
_RENAMES = ((".temporal_pre_norm.", ".input_layernorm."), (".channel_pre_norm.", ".post_attention_layernorm."),
            (".mlp_block.", ".mlp."),
            *((f".temporal_block.{p}_proj.", f".self_attn.{p}_proj.") for p in ("q", "k", "v", "o")))


class RecurrentGemmaForCausalLM(HybridCausalLM, GemmaCausalLM, MappedCausalLM):
    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        layout = self.cfg.options.hybrid
        if layout.layer_kinds[index] == ATTENTION:
            return DecoderLayer(self.cfg, dtype, device, window, prefix=prefix)
        mixer = RecurrentBlock(self.cfg, dtype, device, layout.state_index(index))
        return DecoderLayer(self.cfg, dtype, device, prefix=prefix, mixer=mixer, mixer_name="temporal_block")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield renamed(name, PREFIXES, _RENAMES), tensor
