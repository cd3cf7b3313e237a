"""Torch references of the recurrent layers' ops (hybrid models).

``gated_delta_step``: one token of each of a batch of sequences through the
gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo Hybrid), each
sequence's [k dim, v dim] state per value head read from and written back
to its slot of the state store in place. The rule, per value head:

    S' = exp(g) S
    u = beta (v - S'^T k)
    S = S' + k u^T
    o = S^T q

(``rule_step`` is the same on states already gathered; the engine's
chunked prompt path and verify steps use it.)
"""

from __future__ import annotations

import torch


def rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H] (float32), state [B, H,
    Dk, Dv] float32. Returns (o [B, H, Dv] float32, the new state)."""
    s = state * g.exp()[..., None, None]
    u = (v - torch.einsum("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * u[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", s, q), s


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``rule_step`` of sequence i from ``state[slots[i]]`` (state: [slots, H,
    Dk, Dv] float32), written back there in place. Returns o [B, H, Dv]
    float32."""
    idx = slots.long()
    out, new = rule_step(q, k, v, g, beta, state.index_select(0, idx))
    state.index_copy_(0, idx, new)
    return out
