"""Liquid LFM2-MoE (``Lfm2MoeForCausalLM``): LFM2 (``splitserve.engine.
models.lfm2``) whose layers past ``num_dense_layers`` run a sparse MLP
(``feed_forward``) of SwiGLU experts (``experts.N.w1/w3/w2``) behind a
sigmoid router (``gate``) with an optional per-expert bias
(``expert_bias``, for choosing only), as transformers'
``Lfm2MoeSparseMoeBlock`` routes: in the model dtype, the bias in float32.
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import ShardSlot, empty_param
from splitserve.engine.models.lfm2 import Lfm2ForCausalLM
from splitserve.engine.models.moe import SparseMoeBlock

NAME = "feed_forward"  # the sparse MLP's checkpoint name


class Lfm2MoeBlock(SparseMoeBlock):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 prefix: str = NAME):
        super().__init__(cfg, dtype, device, prefix=prefix)
        self.expert_bias = (empty_param(cfg.moe.num_experts, dtype=torch.float32, device=device)
                            if cfg.options.lfm2.expert_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).sigmoid()  # [T, E]
        if self.expert_bias is not None:  # the bias chooses; the unbiased scores weigh
            ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        else:
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        weights = weights * self.moe.routed_scaling_factor
        return self.run_experts(x, weights.float(), ids)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        if self.expert_bias is not None:
            slots[f"{prefix}.expert_bias"] = ShardSlot(self.expert_bias)
        return slots


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    def feed_forward(self, index: int, dtype: torch.dtype, device: torch.device | str) -> dict:
        if not self.cfg.moe.sparse_layers[index]:  # the first num_dense_layers
            return {}
        prefix = f"model.layers.{index}.{NAME}"
        return {"mlp": Lfm2MoeBlock(self.cfg, dtype, device, prefix=prefix), "mlp_name": NAME}
