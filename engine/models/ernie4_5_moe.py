"""ERNIE 4.5 MoE: the dense ERNIE 4.5 decoder (q/k rows reordered at load for
its interleaved RoPE, ``splitserve.engine.models.ernie4_5``) with the sparse
MLP of ``splitserve.engine.models.moe`` in the layers ``ModelConfig.moe``
marks sparse (``splitserve.engine.dialects.ernie4_5_moe``).

Its router (transformers' ``Ernie4_5_MoeTopKRouter``), in float32 whatever
the model dtype, as transformers keeps it:

1. probabilities = softmax(router logits) over the E experts;
2. the experts chosen are the top k of the probabilities plus the
   checkpoint's ``moe_statics.e_score_correction_bias`` ([1, E]);
3. their weights are their unbiased probabilities divided by their sum,
   clamped below at ``moe_norm_min``.

The ungated shared experts (``mlp.shared_experts``) add to the routed
experts' output. Multi-token-prediction tensors (any name with ``mtp``)
are skipped at load, as transformers skips them. LoRA adapters are refused
(the q/k rows' reordering, as for the dense ERNIE 4.5).
"""

from __future__ import annotations

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.ernie4_5 import Ernie4_5CausalLM
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.moe import MoECausalLM, SparseMoeBlock


def route_corrected_softmax(router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int,
                            norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E]; correction_bias: [E] -> (weights [T, K] float32,
    expert ids [T, K] int64), as ``Ernie4_5_MoeTopKRouter`` computes them."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    ids = torch.topk(probs + correction_bias.float(), top_k, dim=-1)[1]
    weights = probs.gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min), ids


class Ernie4_5MoeBlock(SparseMoeBlock):
    """The experts with ERNIE's float32 router and its [1, E] correction bias."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix=prefix)
        e = cfg.moe.num_experts
        self.gate = Linear(cfg.hidden_size, e, False, torch.float32, device)  # kept in float32
        self.correction_bias = empty_param(1, e, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_corrected_softmax(self.gate(x.float()), self.correction_bias[0], self.top_k,
                                               self.moe.corrected_softmax_norm_min)
        out = self.run_experts(x, weights, ids)
        return out if self.shared_expert is None else out + self.shared_expert(x)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        slots[f"{prefix}.moe_statics.e_score_correction_bias"] = ShardSlot(self.correction_bias)
        return slots


class Ernie4_5MoeCausalLM(Ernie4_5CausalLM, MoECausalLM):
    """ERNIE 4.5 MoE (``Ernie4_5_MoeForCausalLM``): q/k rows reordered at load,
    ERNIE's router in the sparse layers, multi-token-prediction tensors skipped."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        if not cfg.moe.sparse_layers[index]:
            return self.layer_class(cfg, dtype, device, window, prefix=prefix)
        return self.layer_class(cfg, dtype, device, window, prefix=prefix, mlp_name="mlp",
                                mlp=Ernie4_5MoeBlock(cfg, dtype, device, prefix=f"{prefix}.mlp"))

    def _skipped(self, name: str) -> bool:
        return super()._skipped(name) or "mtp" in name
