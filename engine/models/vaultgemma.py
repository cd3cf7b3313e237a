"""VaultGemma (``VaultGemmaForCausalLM``): Gemma 2 without its norms after
attention and after the MLP, so Gemma's layers (``GemmaCausalLM`` with
``sandwich_norms`` off) with Gemma 2's scales and soft caps; each layer's
``pre_feedforward_layernorm`` is loaded as the pre-MLP norm
(``post_attention_layernorm`` in the shared decoder's names).
(``splitserve.engine.dialects.vaultgemma`` reads its config.json.)
LoRA adapters are refused, as for the other renamed families.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.models.gemma import GemmaCausalLM
from splitserve.engine.models.mapped import MappedCausalLM


class VaultGemmaCausalLM(MappedCausalLM, GemmaCausalLM):
    """VaultGemma: Gemma's layers, its pre-MLP norm renamed at load."""

    lora_refusal = ("LoRA adapters are not supported for VaultGemma checkpoints (a norm is "
                    "renamed at load)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield name.replace(".pre_feedforward_layernorm.", ".post_attention_layernorm."), tensor
