"""Flint (``FlintForCausalLM``): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with gpt-oss's attention sinks and
SmolLM3's NoPE layers, all set from ``ModelConfig``
(``splitserve.engine.dialects.flint``).

What this class adds: the sparse layers run ``FlintMoeBlock``, as
transformers' ``FlintTopKRouter`` / ``FlintSparseMoeBlock`` do: the router
weight kept in float32 and the logits computed in float32 whatever the
model dtype, the top k of their sigmoid chosen and (``MoEConfig.renormalize``)
divided by their sum, the ungated shared expert ``mlp.shared_expert`` summed
in. The full-attention layers get no RoPE table. The checkpoints'
``self_attn.softmax_offset`` (the sinks' stored name, as transformers'
weight conversion reads it) loads into ``self_attn.sinks``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear
from splitserve.engine.models.moe import MoECausalLM, SparseMoeBlock
from splitserve.engine.models.smollm3 import SmolLM3CausalLM

_SINKS = (".self_attn.softmax_offset", ".self_attn.sinks")


def route_sigmoid(router_logits: torch.Tensor, top_k: int,
                  renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] float32 -> (weights [T, K] float32, expert ids [T, K]):
    the top k sigmoid scores, divided by their sum with ``renormalize``."""
    weights, ids = torch.topk(router_logits.sigmoid(), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FlintMoeBlock(SparseMoeBlock):
    """The experts with Flint's float32 sigmoid router and ungated shared expert."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix=prefix)
        self.gate = Linear(cfg.hidden_size, cfg.moe.num_experts, False, torch.float32, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_sigmoid(self.gate(x.float()), self.top_k, self.renormalize)
        return self.run_experts(x, weights, ids) + self.shared_expert(x)


class FlintCausalLM(SmolLM3CausalLM, MoECausalLM):
    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        if not cfg.moe.sparse_layers[index]:
            return DecoderLayer(cfg, dtype, device, window, prefix=prefix)
        return DecoderLayer(cfg, dtype, device, window, prefix=prefix, mlp_name="mlp",
                            mlp=FlintMoeBlock(cfg, dtype, device, prefix=f"{prefix}.mlp"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(*_SINKS) if name.endswith(_SINKS[0]) else name, tensor)
                             for name, tensor in weights)
