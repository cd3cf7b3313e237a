"""The grouped sigmoid router of GLM-4.5 (``Glm4MoeTopkRouter``), dots.llm1
(``Dots1TopkRouter``) and DeepSeek-V3 (``DeepseekV3TopkRouter``, "noaux_tc"
routing); DeepSeek-V2's softmax router (``route_softmax_groups``) beside it.

For each token, in float32 as transformers computes it:

1. scores = sigmoid(router logits) over the E experts;
2. for choosing only, each expert's learned ``e_score_correction_bias``
   is added to its score;
3. the experts are split into ``num_groups`` equal groups in order, each
   group rated by the sum of its two best biased scores, and the
   ``topk_groups`` best groups kept;
4. the ``top_k`` best biased scores among the kept groups' experts choose
   the experts;
5. their weights are their UNBIASED scores, divided by their sum
   (+ 1e-20) with ``renormalize``, then times ``routed_scaling_factor``.

The weights and ids go to the fused experts (``ops.fused_moe``) exactly as
the softmax router's do (``splitserve.engine.models.moe.route``).
"""

from __future__ import annotations

import torch

from splitserve.engine.config import MoEConfig


def route_grouped(router_logits: torch.Tensor, correction_bias: torch.Tensor,
                  moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E]; correction_bias: [E] -> (weights [T, K] float32,
    expert ids [T, K] int64)."""
    t, e = router_logits.shape
    scores = router_logits.float().sigmoid()
    for_choice = scores + correction_bias.float()
    group_scores = for_choice.view(t, moe.num_groups, e // moe.num_groups).topk(2, dim=-1)[0].sum(dim=-1)
    for_choice = for_choice.masked_fill(~_kept_experts(group_scores, moe, e), float("-inf"))
    ids = torch.topk(for_choice, k=moe.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if moe.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids


def route_softmax_groups(router_logits: torch.Tensor, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's router (``DeepseekV2TopkRouter``), in float32: softmax
    scores over the E experts; with ``moe.group_limited`` (topk_method
    group_limited_greedy) each group rated by its best score and the scores
    outside the ``topk_groups`` best groups zeroed; the ``top_k`` best scores,
    never renormalised, times ``routed_scaling_factor``.
    router_logits: [T, E] -> (weights [T, K] float32, expert ids [T, K] int64)."""
    t, e = router_logits.shape
    scores = router_logits.float().softmax(dim=-1)
    if moe.group_limited:
        group_scores = scores.view(t, moe.num_groups, e // moe.num_groups).max(dim=-1).values
        scores = scores.masked_fill(~_kept_experts(group_scores, moe, e), 0.0)
    weights, ids = torch.topk(scores, k=moe.top_k, dim=-1, sorted=False)
    return weights * moe.routed_scaling_factor, ids


def _kept_experts(group_scores: torch.Tensor, moe: MoEConfig, e: int) -> torch.Tensor:
    """[T, G] group ratings -> [T, E] bool: the experts of each token's
    ``topk_groups`` best groups."""
    t = group_scores.shape[0]
    groups = torch.topk(group_scores, k=moe.topk_groups, dim=-1, sorted=False)[1]
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    return kept.unsqueeze(-1).expand(t, moe.num_groups, e // moe.num_groups).reshape(t, e)
