"""HunYuan dense V1: the Llama decoder with per-head q/k norms after RoPE.

transformers' HunYuanDenseV1Attention rotates q and k first and then
RMSNorms each head (``query_layernorm`` / ``key_layernorm``, one weight of
``head_dim``); the engine's ``Attention`` does the same with
``FamilyOptions.qk_norm_after_rope``, and the checkpoint's norm tensors are
renamed at load onto its ``q_norm`` / ``k_norm`` slots. The keys are cached
normed. Projections keep Llama's names, so LoRA adapters and tensor
parallelism (per-head norms split by head) work as for Qwen3.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.models.llama import CausalLM

_RENAMES = ((".self_attn.query_layernorm.", ".self_attn.q_norm."),
            (".self_attn.key_layernorm.", ".self_attn.k_norm."))


class HunYuanDenseCausalLM(CausalLM):
    """HunYuan dense V1 (``HunYuanDenseV1ForCausalLM``): q/k norm tensors renamed at load."""

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            for old, new in _RENAMES:
                name = name.replace(old, new)
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.renamed(weights))
