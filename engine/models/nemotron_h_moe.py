"""Nemotron-H's sparse MLP block (transformers' ``NemotronHMoE``, Nemotron 3):
DeepSeek-V3's grouped sigmoid router (``splitserve.engine.models.grouped_router``:
sigmoid scores, the correction bias for choosing, the ``topk_groups`` best of
``num_groups`` groups, ``top_k`` experts, their unbiased scores renormalised
and times ``routed_scaling_factor``) over ungated experts, each
``down(act(up(x)))`` with the MLP blocks' activation (relu2); with ``FamilyOptions.moe_latent_size`` the experts
work in that width, between ``fc1_latent_proj`` and ``fc2_latent_proj``; a
shared ungated MLP (``shared_experts``) of ``shared_expert_intermediate_size``
on every token, its output added.

The experts run one at a time over the tokens routed to them (the fused
expert kernels compute gated experts only); ``weight_dtype: fp8`` quantizes
the shared MLP and latent projections, the experts stay in the model dtype.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.models.grouped_router import route_grouped
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.moe import ExpertSlot
from splitserve.engine.models.plain_blocks import PlainMLP


class NemotronHMoE(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__()
        moe, h = cfg.moe, cfg.hidden_size
        e, i, d = moe.num_experts, moe.expert_intermediate_size, cfg.options.moe_latent_size or h
        self.moe = moe
        self.gate = Linear(h, e, False, torch.float32, device)  # the router, in float32
        self.e_score_correction_bias = empty_param(e, dtype=torch.float32, device=device)
        self.up = empty_param(e, i, d, dtype=dtype, device=device)
        self.down = empty_param(e, d, i, dtype=dtype, device=device)
        latent = cfg.options.moe_latent_size > 0
        self.fc1_latent_proj = Linear(h, d, cfg.mlp_bias, dtype, device) if latent else None
        self.fc2_latent_proj = Linear(d, h, cfg.mlp_bias, dtype, device) if latent else None
        shared_cfg = dataclasses.replace(cfg, intermediate_size=moe.shared_expert_intermediate_size)
        self.shared_experts = PlainMLP(shared_cfg, dtype, device, prefix=f"{prefix}.shared_experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_grouped(self.gate(x.float()), self.e_score_correction_bias, self.moe)
        h = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)
        out = torch.zeros_like(h)
        for e in ids.unique().tolist():  # in expert order, as transformers sums them
            rows, slot = torch.where(ids == e)
            y = F.linear(self.shared_experts.act(F.linear(h[rows], self.up[e])), self.down[e])
            out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
        if self.fc2_latent_proj is not None:
            out = self.fc2_latent_proj(out)
        return out + self.shared_experts(x)

    def quantize_fp8_(self) -> None:
        self.shared_experts.quantize_fp8_()
        for lin in (self.fc1_latent_proj, self.fc2_latent_proj):
            if lin is not None:
                lin.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = linear_slots(self.gate, [(f"{prefix}.gate", 0, self.gate.out_features)], None)
        slots[f"{prefix}.gate.e_score_correction_bias"] = ShardSlot(self.e_score_correction_bias)
        for e in range(self.up.shape[0]):
            slots[f"{prefix}.experts.{e}.up_proj.weight"] = ExpertSlot(self.up, expert=e)
            slots[f"{prefix}.experts.{e}.down_proj.weight"] = ExpertSlot(self.down, expert=e)
        for name in ("fc1_latent_proj", "fc2_latent_proj"):
            lin = getattr(self, name)
            if lin is not None:
                slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        slots.update(self.shared_experts.weight_slots(f"{prefix}.shared_experts"))
        return slots
