"""Cohere 2 MoE (``Cohere2MoeForCausalLM``): Cohere 2's decoder
(``splitserve.engine.models.cohere2``: the parallel residual on one norm,
q/k rows reordered at load for its interleaved RoPE, full-attention layers
without RoPE, scaled logits) with experts in the layers ``ModelConfig.moe``
marks sparse (``splitserve.engine.dialects.cohere2_moe``).

Its router (transformers' ``Cohere2MoeTopKRouter``) picks the top k router
logits, computed in the model dtype, and weights them by their float32
softmax or (``MoEConfig.topk_sigmoid``) their sigmoid, divided by its sum
with ``renormalize``; the weights are rounded to the model dtype, as
transformers casts them back. The ungated shared experts
(``mlp.shared_experts``) are averaged with the routed experts' output
(``MoEConfig.shared_expert_average``) or added to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.models.cohere import CohereDecoderLayer
from splitserve.engine.models.cohere2 import Cohere2CausalLM
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.moe import MoECausalLM, SparseMoeBlock


def route_topk(router_logits: torch.Tensor, top_k: int, sigmoid: bool,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] in the model dtype -> (weights [T, K] float32,
    expert ids [T, K] int64), as ``Cohere2MoeTopKRouter`` computes them."""
    top, ids = torch.topk(router_logits, top_k, dim=-1)
    if sigmoid:
        weights = torch.sigmoid(top)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        weights = F.softmax(top, dim=-1, dtype=torch.float32)
    return weights.to(router_logits.dtype).float(), ids


class Cohere2MoeBlock(SparseMoeBlock):
    """The experts with Cohere 2 MoE's top-k router and averaged (or summed) shared experts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_topk(self.gate(x), self.top_k, self.moe.topk_sigmoid, self.renormalize)
        out = self.run_experts(x, weights, ids)
        if self.shared_expert is None:
            return out
        out = out + self.shared_expert(x)
        return out / 2 if self.moe.shared_expert_average else out


class Cohere2MoeCausalLM(Cohere2CausalLM, MoECausalLM):
    """Cohere 2 MoE: Cohere's layers, ``Cohere2MoeBlock`` in the sparse ones."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        if not cfg.moe.sparse_layers[index]:
            return CohereDecoderLayer(cfg, dtype, device, window, prefix=prefix)
        return CohereDecoderLayer(cfg, dtype, device, window, prefix=prefix,
                                  mlp=Cohere2MoeBlock(cfg, dtype, device, prefix=f"{prefix}.mlp"))
