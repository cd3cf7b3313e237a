"""Mixture-of-experts families: Mixtral, Qwen2-MoE and Qwen3-MoE.

They are the dense decoder of ``splitserve.engine.models.llama`` with a
sparse MLP in some or all layers (``ModelConfig.moe.sparse_layers``): a
router (``gate``, a [E, hidden] linear) scores the experts for each token,
the ``top_k`` best run through ``ops.fused_moe`` and their outputs are
summed with the routing weights. Qwen2-MoE adds a shared expert that every
token runs, scaled by a sigmoid gate.

Routing, as transformers does it: softmax over all experts' logits in
float32, then the top k; Mixtral renormalises the k probabilities to sum to
one (the same as a softmax over the top-k logits), Qwen only with
``norm_topk_prob``.

Checkpoints store each expert's projections separately
(``...block_sparse_moe.experts.3.w1.weight`` in Mixtral,
``...mlp.experts.3.gate_proj.weight`` in Qwen); they are loaded into two
stacked weights, ``w_gate_up`` [E, 2I, hidden] (rows [gate | up] per expert)
and ``w_down`` [E, hidden, I], the layout the fused kernel reads. Every
replica holds every expert.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import MLP, DecoderLayer, Linear, ShardSlot, empty_param
from splitserve.engine.models.llama import CausalLM
from splitserve.kernels import ops

# family -> (the sparse block's name in checkpoints, its experts' (gate, up, down) names)
CHECKPOINT_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


@dataclasses.dataclass(frozen=True)
class ExpertSlot(ShardSlot):
    """Rows [start, start + size) of expert ``expert``'s slice of a stacked [E, ...] weight."""

    expert: int = 0

    @property
    def target(self) -> torch.Tensor:
        t = self.param.data[self.expert]
        return t if self.start is None else t.narrow(0, self.start, self.size)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, K] float32, expert ids [T, K] int64)."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        moe = cfg.moe
        h, i, e = cfg.hidden_size, moe.expert_intermediate_size, moe.num_experts
        self.top_k, self.renormalize, self.intermediate = moe.top_k, moe.renormalize, i
        self.expert_names = CHECKPOINT_NAMES[cfg.family][1]
        self.gate = Linear(h, e, False, dtype, device)  # the router
        self.w_gate_up = empty_param(e, 2 * i, h, dtype=dtype, device=device)
        self.w_down = empty_param(e, h, i, dtype=dtype, device=device)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=moe.shared_expert_intermediate_size)
            self.shared_expert = MLP(shared_cfg, dtype, device)
            self.shared_expert_gate = Linear(h, 1, False, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> router logits [T, E] -> K experts per token -> [T, hidden]
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = ops.fused_moe(x, self.w_gate_up, self.w_down, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        gate, up, down = self.expert_names
        i = self.intermediate
        slots: dict[str, ShardSlot] = {f"{prefix}.gate.weight": ShardSlot(self.gate.weight)}
        for e in range(self.w_gate_up.shape[0]):
            p = f"{prefix}.experts.{e}"
            slots[f"{p}.{gate}.weight"] = ExpertSlot(self.w_gate_up, 0, i, expert=e)
            slots[f"{p}.{up}.weight"] = ExpertSlot(self.w_gate_up, i, i, expert=e)
            slots[f"{p}.{down}.weight"] = ExpertSlot(self.w_down, expert=e)
        if self.shared_expert is not None:
            slots.update(self.shared_expert.weight_slots(f"{prefix}.shared_expert"))
            slots[f"{prefix}.shared_expert_gate.weight"] = ShardSlot(self.shared_expert_gate.weight)
        return slots


class MoECausalLM(CausalLM):
    """The decoder with a ``SparseMoeBlock`` in the layers ``cfg.moe`` marks sparse."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg = self.cfg
        if not cfg.moe.sparse_layers[index]:  # Qwen mlp_only_layers / decoder_sparse_step
            return DecoderLayer(cfg, dtype, device, window)
        return DecoderLayer(cfg, dtype, device, window, mlp=SparseMoeBlock(cfg, dtype, device),
                            mlp_name=CHECKPOINT_NAMES[cfg.family][0])
