"""GPT-Neo: GPT-2's decoder and checkpoint names
(``splitserve.engine.models.gpt2``) with nn.Linear weights, stored
[out, in] and so not transposed, and unfused attention projections, some
layers attending to a sliding window (``ModelConfig.layer_windows``, from
``splitserve.engine.dialects.gpt_neo``), none scaling their scores.

Its attention sits one module deeper than GPT-2's:
``transformer.h.N.attn.attention.{q,k,v,out}_proj``. Those names are read
as GPT-2's (``attn.{q,k,v}_proj``, ``out_proj`` as ``attn.c_proj``), then
mapped as GPT-2's are; the causal-mask buffers of older exports
(``attn.attention.bias``, ``masked_bias``) are skipped with GPT-2's.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.gpt2 import GPT2CausalLM
from splitserve.engine.models.lora_layers import LoraStack

_AS_GPT2 = ((".attn.attention.out_proj.", ".attn.c_proj."), (".attn.attention.", ".attn."))


class GPTNeoCausalLM(GPT2CausalLM):
    """GPT-Neo (``GPTNeoForCausalLM``): names mapped through GPT-2's at load."""

    conv1d_weights = ()

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        def as_gpt2(name: str) -> str:
            for old, new in _AS_GPT2:
                name = name.replace(old, new, 1)
            return name
        return super().renamed((as_gpt2(name), tensor) for name, tensor in weights)

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for GPT-Neo checkpoints (its "
                              "projections sit under transformer.h.N.attn.attention, which adapters "
                              "do not map onto)")
