"""Gemma 4's experts (``enable_moe_block``: the 26B-A4B model), as transformers'
``Gemma4TextRouter`` and ``Gemma4TextExperts`` compute them. They run beside each
layer's dense MLP (``Gemma4DecoderLayer`` sums the two, each behind its own norm).

The router (``router``) scores the experts on the layer's residual stream: RMSNormed
without a weight, times its ``scale`` [hidden] and hidden_size ** -0.5, through
``proj`` [E, hidden]; a float32 softmax over all experts, the top k renormalised to
sum to one, each then times its expert's ``per_expert_scale``. The experts
(``pre_feedforward_layernorm_2``'s output) are GeGLU MLPs stored fused as
transformers stores them, ``experts.gate_up_proj`` [E, 2I, hidden] (rows [gate | up])
and ``experts.down_proj`` [E, hidden, I]: the stacked layout the engine's expert
loop reads as it is. They run in torch (``routed_experts``: the fused kernel's
activation is SiLU), every expert on every token while a CUDA graph is captured
(``GptOssMoE.every_expert``); ``weight_dtype: fp8`` leaves them unquantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.gpt_oss import GptOssMoE
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.kernels import ops
from splitserve.kernels.reference import routed_experts


class Gemma4Experts(nn.Module):
    """One layer's router and experts (``router.*``, ``experts.*`` in checkpoints)."""

    every_expert = GptOssMoE.every_expert  # the capture-safe loop, over self.expert

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = cfg.options.gemma4
        h, i, e = cfg.hidden_size, shape.moe_intermediate, shape.num_experts
        self.top_k, self.eps, self.hidden = shape.top_k, cfg.rms_norm_eps, h
        self.gelu = cfg.options.hidden_act == "gelu_tanh"
        self.proj = Linear(h, e, False, dtype, device)
        self.scale = empty_param(h, dtype=dtype, device=device)
        self.per_expert_scale = empty_param(e, dtype=dtype, device=device)
        self.w_gate_up = empty_param(e, 2 * i, h, dtype=dtype, device=device)
        self.w_down = empty_param(e, h, i, dtype=dtype, device=device)
        self.register_buffer("unit_weight", torch.ones(h, dtype=dtype, device=device), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] (the residual stream) -> (weights [T, K], expert ids [T, K])."""
        h = ops.rms_norm(x, self.unit_weight, self.eps, None, True)[0]
        probs = F.softmax(self.proj(h * self.scale * self.hidden ** -0.5), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` [n, hidden] -> [n, hidden]."""
        gate, up = ops.linear(x, self.w_gate_up[e]).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return ops.linear(act * up, self.w_down[e])

    def forward(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The experts on ``x`` (normed), routed by ``residual``: [T, hidden]."""
        weights, ids = self.route(residual)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.every_expert(x, weights, ids)
        return routed_experts(x, weights, ids, self.w_gate_up.shape[0], self.expert)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = linear_slots(self.proj, [(f"{prefix}.router.proj", 0, self.proj.out_features)], None)
        slots[f"{prefix}.router.scale"] = ShardSlot(self.scale)
        slots[f"{prefix}.router.per_expert_scale"] = ShardSlot(self.per_expert_scale)
        slots[f"{prefix}.experts.gate_up_proj"] = ShardSlot(self.w_gate_up)
        slots[f"{prefix}.experts.down_proj"] = ShardSlot(self.w_down)
        return slots
