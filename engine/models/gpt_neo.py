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

from typing import Iterator

import torch

from splitserve.engine.models.gpt2 import GPT2CausalLM
from splitserve.engine.models.mapped import renamed

_AS_GPT2 = ((".attn.attention.out_proj.", ".attn.c_proj."), (".attn.attention.", ".attn."))


class GPTNeoCausalLM(GPT2CausalLM):
    """GPT-Neo (``GPTNeoForCausalLM``): names mapped through GPT-2's at load."""

    conv1d_weights = ()
    lora_refusal = ("LoRA adapters are not supported for GPT-Neo checkpoints (its projections sit "
                    "under transformer.h.N.attn.attention, which adapters do not map onto)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        return super().mapped(renamed(name, (), _AS_GPT2, count=1), tensor)
