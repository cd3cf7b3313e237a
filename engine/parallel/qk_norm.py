"""q/k RMSNorms over a token's whole q and k (OLMo 2, OLMo 3, OLMoE, FlexOlmo,
MiniMax-M2: ``FamilyOptions.full_qk_norm``) on a tensor-parallel rank.

Each rank holds its query heads' slice of q and of ``q_norm``'s weight, its
KV heads' slice of k and of ``k_norm``'s weight (``sharding``). The mean of
squares is over the full width, so each rank sums the squares of its slices
in float32, one all-reduce adds the ranks' [T, 2] sums (q's and k's stacked),
and each rank scales its slice by ``rsqrt(sum / full width + eps)`` and its
weight slice, rounding as ``ops.rms_norm`` does. A KV head replicated on
several ranks (fewer KV heads than ranks) counts once: only the first rank
holding it (``ShardPlan.kv_head_owner``) adds its k squares.
"""

from __future__ import annotations

import torch

from splitserve.engine.models.layers import RMSNorm
from splitserve.engine.parallel.group import TPGroup


class SplitQKNorm:
    """The all-head q/k norms of one rank of ``tp``'s replica."""

    def __init__(self, tp: TPGroup):
        plan = tp.plan
        cfg = plan.cfg
        self.tp = tp
        self.q_width = cfg.num_heads * cfg.head_dim
        self.k_width = cfg.num_kv_heads * cfg.head_dim
        self.counts_k = plan.kv_head_owner(plan.kv_heads()[0]) == plan.rank

    def __call__(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm,
                 k_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq/N, D] and k [T, Hk/N (or 1), D], the rank's heads, normed
        over every rank's heads; same shapes."""
        t = q.shape[0]
        qf, kf = q.reshape(t, -1).float(), k.reshape(t, -1).float()
        sums = torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1) if self.counts_k
                            else torch.zeros(t, dtype=torch.float32, device=k.device)], dim=-1)
        self.tp.all_reduce(sums)  # [T, 2]: the whole q's and k's sums of squares
        q_out = scaled(qf, sums[:, :1] / self.q_width, q_norm, q.dtype)
        k_out = scaled(kf, sums[:, 1:] / self.k_width, k_norm, k.dtype)
        return q_out.view(q.shape), k_out.view(k.shape)


def scaled(xf: torch.Tensor, var: torch.Tensor, norm: RMSNorm, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``xf`` [T, W] normed by the full width's mean of squares
    ``var`` [T, 1], times the rank's slice of ``norm``'s weight, rounded as
    ``ops.rms_norm`` rounds (``fp32_product``: the product once)."""
    normed = xf * torch.rsqrt(var + norm.eps)
    if norm.fp32_product:
        return (normed * norm.weight.float()).to(dtype)
    return norm.weight * normed.to(dtype)
