"""Flint (``FlintForCausalLM``): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with gpt-oss's attention sinks and
SmolLM3's NoPE layers, all set from ``ModelConfig``
(``splitserve.engine.dialects.flint``).

What this class adds: the sparse layers run ``Cohere2MoeBlock`` (the top-k
router logits weighted by their sigmoid, renormalised, and the ungated
shared expert ``mlp.shared_expert`` summed in), as transformers'
``FlintSparseMoeBlock`` does; the full-attention layers get no RoPE table;
the checkpoints' ``self_attn.softmax_offset`` (the sinks' stored name, as
transformers' weight conversion reads it) loads into ``self_attn.sinks``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.cohere2_moe import Cohere2MoeBlock
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.smollm3 import SmolLM3CausalLM


_SINKS = (".self_attn.softmax_offset", ".self_attn.sinks")


class FlintCausalLM(SmolLM3CausalLM, MoECausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(*_SINKS) if name.endswith(_SINKS[0]) else name, tensor)
                             for name, tensor in weights)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        if not cfg.moe.sparse_layers[index]:
            return DecoderLayer(cfg, dtype, device, window, prefix=prefix)
        return DecoderLayer(cfg, dtype, device, window, prefix=prefix, mlp_name="mlp",
                            mlp=Cohere2MoeBlock(cfg, dtype, device, prefix=f"{prefix}.mlp"))
