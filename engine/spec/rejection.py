"""Rejection sampling of draft tokens: the accepted or resampled token is
distributed exactly as the target model's own sample.

For a draft token ``x`` drawn from the draft distribution ``q`` and the
target's sampling distribution ``p`` at that position: accept ``x`` with
probability ``min(1, p(x) / q(x))``; on rejection draw from
``normalize(max(0, p - q))``. Then P(token = t) = min(p(t), q(t)) +
(1 - sum_t' min(p(t'), q(t'))) * max(0, p(t) - q(t)) / Z = p(t) (Leviathan et
al., Chen et al. 2023). The proposers of ``splitserve.engine.spec`` draft
greedily, so ``q`` is a point mass on ``x``: accept with probability
``p(x)``, else draw from ``p`` without ``x``.

Seeded requests do not come here (``splitserve.engine.sampler``): their
token at each position is the sampler's own seeded draw, compared with the
draft; for a point-mass ``q`` that draw is accepted with probability
``p(x)`` and otherwise distributed as ``p`` without ``x``, the same law as
above, and the output equals the non-speculative output token for token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rejection_sample(p: Tensor, draft: Tensor, uniforms: Tensor, noise: Tensor,
                     q: Tensor | None = None) -> Tensor:
    """One verified token per row.

    p: [S, V] target probabilities; draft: [S] int64 draft tokens;
    uniforms: [S] U(0, 1); noise: [S, V] Exp(1), never 0 (the residual
    draw is an exponential race, ``argmax(r / E)``, which picks token t with
    probability r(t) / sum(r)); q: [S, V] draft probabilities, None for a
    point mass on ``draft``. Returns [S] int64 tokens: ``draft`` where
    accepted, else a draw from the residual."""
    px = p.gather(1, draft[:, None])[:, 0]
    if q is None:
        accept = uniforms < px  # u < p(x) / 1
        residual = p.scatter(1, draft[:, None], 0.0)
    else:
        qx = q.gather(1, draft[:, None])[:, 0]
        accept = uniforms * qx < px  # u < p(x) / q(x), q(x) > 0 for a drawn x
        residual = (p - q).clamp_min_(0.0)
    # p == q leaves no residual mass, but then every draft is accepted; p
    # keeps the draw well defined for those rows all the same
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p, residual)
    resampled = residual.div_(noise).argmax(dim=-1)
    return torch.where(accept, draft, resampled)


def sample_with_drafts(probs: Tensor, noise: Tensor, drafts: list[int | None],
                       generator: torch.Generator) -> Tensor:
    """The sampler's draw over ``probs`` [S, V] (its exponential race with
    ``noise``), except that rows with a draft token verify it by
    ``rejection_sample`` (point-mass ``q``), uniforms from ``generator``."""
    tokens = probs.div(noise).argmax(dim=-1)
    rows = [i for i, d in enumerate(drafts) if d is not None]
    if not rows:
        return tokens
    dev = probs.device
    idx = torch.tensor(rows, device=dev)
    draft = torch.tensor([drafts[i] for i in rows], dtype=torch.int64, device=dev)
    u = torch.rand(len(rows), generator=generator).to(dev)
    tokens[idx] = rejection_sample(probs[idx], draft, u, noise[idx])
    return tokens
