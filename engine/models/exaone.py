"""EXAONE 3.0 / 3.5 (``ExaoneForCausalLM``): the Llama decoder under its own
tensor names, mapped at load as transformers' conversion mapping does:
``transformer.wte`` / ``transformer.h.N`` / ``transformer.ln_f`` are
``model.embed_tokens`` / ``model.layers.N`` / ``model.norm``; in each layer
``ln_1`` / ``ln_2`` are the input and post-attention norms,
``attn.attention.{q,k,v,out}_proj`` the attention's q/k/v/o, and
``mlp.c_fc_0`` / ``c_fc_1`` / ``c_proj`` the MLP's gate / up / down.
Checkpoints already in Llama's names load as they are.
(``splitserve.engine.dialects.exaone`` reads its config.json.)
LoRA adapters are refused: they would name the renamed projections.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
            ("transformer.ln_f.", "model.norm."))
_LAYER_RENAMES = ((".attn.attention.", ".self_attn."), (".self_attn.out_proj.", ".self_attn.o_proj."),
                  (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                  (".mlp.c_fc_0.", ".mlp.gate_proj."), (".mlp.c_fc_1.", ".mlp.up_proj."),
                  (".mlp.c_proj.", ".mlp.down_proj."))


class ExaoneCausalLM(MappedCausalLM):
    """EXAONE 3 (``ExaoneForCausalLM``): checkpoint names mapped at load."""

    lora_refusal = ("LoRA adapters are not supported for EXAONE 3 checkpoints (its tensors are "
                    "renamed at load; adapters would name its own projections)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield renamed(name, _RENAMES, _LAYER_RENAMES, count=1), tensor
