"""PhiMoE's router (transformers' ``sparsemixer``) as it runs at inference.

In eval mode sparsemixer always picks two experts (whatever
``num_experts_per_tok`` says) and weights each by a softmax over a masked
set of router logits; ``jitter_eps`` is the config's
``router_jitter_noise``, which keeps its effect at inference:

1. the first expert is the best logit m1; its weight is its softmax
   probability among the experts whose logit s has
   ``(m1 - s) / max(|s|, m1) <= 2 * jitter_eps`` (the others masked out);
2. the second is the best logit m2 once the first is masked out; its weight
   is its softmax probability among the experts other than the first with
   ``(m2 - s) / max(|s|, m2) <= 2 * jitter_eps``.

The weights are not renormalised. The same tensor ops in the same order
as transformers, in the router logits' dtype; the weights go to the fused
experts (``ops.fused_moe``) as float32, as ``splitserve.engine.models.moe.route``'s do.
"""

from __future__ import annotations

import torch


def _masked_pick(masked: torch.Tensor, scores: torch.Tensor,
                 jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [T, 1], expert id [T, 1]) of the best of ``masked`` (the router
    logits with any expert already chosen at -inf), softmaxed among the experts
    within the threshold of it."""
    best, ids = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=best)
    gates = masked.masked_fill(((best - scores) / factor) > (2 * jitter_eps), float("-inf"))
    return torch.softmax(gates, dim=-1).gather(dim=-1, index=ids), ids


def route_sparsemixer(router_logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, 2] float32, expert ids [T, 2] int64)."""
    first, first_ids = _masked_pick(router_logits, router_logits, jitter_eps)
    rest = torch.scatter(router_logits, -1, first_ids, float("-inf"))
    second, second_ids = _masked_pick(rest, router_logits, jitter_eps)
    return torch.cat((first, second), dim=-1).float(), torch.cat((first_ids, second_ids), dim=-1)
