"""Torch references of the recurrent layers' ops (hybrid models).

``gated_delta_step``: one token of each of a batch of sequences through the
gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo Hybrid; with a
decay per key channel, Kimi Delta Attention: Kimi Linear, the Bailing
hybrid), each sequence's [k dim, v dim] state per value head read from and
written back to its slot of the state store in place. The rule, per value
head (g a scalar, or a [k dim] vector decaying each row of S; without beta,
no correction: u = v, linear attention with a decay, MiniMax's lightning
attention):

    S' = exp(g) S
    u = beta (v - S'^T k)
    S = S' + k u^T
    o = S^T q

(``rule_step`` is the same on states already gathered; the engine's
chunked prompt path and verify steps use it.)

``ssm_scan_step``: one token of each sequence through a Mamba-2 layer's
selective state space (Mamba-2 and the hybrids built on it: Nemotron-H,
Granite 4 hybrids, Falcon-H1, Bamba, Zamba2), a [head dim, state size]
state per head in its slot, in place:

    S = exp(dt A) S + dt x B^T
    y = S C + D x

(``scan_step`` on gathered states.)

``selective_scan_step``: one token of each sequence through a Mamba-1
layer's selective scan (Mamba, Falcon Mamba, Jamba), an [inner, state
size] state per sequence, a decay per channel and state entry:

    S = exp(dt A) S + (dt u) B^T
    y = S C         (in u's dtype; the layer adds D u and gates it)
"""

from __future__ import annotations

import torch


def rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              beta: torch.Tensor | None, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, Dk], v [B, H, Dv], g [B, H] (or [B, H, Dk]: per key channel),
    beta [B, H] or None (no correction) (float32), state [B, H, Dk, Dv] float32.
    Returns (o [B, H, Dv] float32, the new state)."""
    s = state * (g.exp()[..., None] if g.dim() == k.dim() else g.exp()[..., None, None])
    u = v if beta is None else (v - torch.einsum("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * u[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", s, q), s


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor | None, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``rule_step`` of sequence i from ``state[slots[i]]`` (state: [slots, H,
    Dk, Dv] float32), written back there in place. Returns o [B, H, Dv]
    float32."""
    idx = slots.long()
    out, new = rule_step(q, k, v, g, beta, state.index_select(0, idx))
    state.index_copy_(0, idx, new)
    return out


def scan_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, H, P], dt [b, H], A and D [H], B and C [b, H, N] (float32), state
    [b, H, P, N] float32. Returns (y [b, H, P], the new state)."""
    decay = torch.exp(dt * A)[..., None, None]
    state = state * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D[:, None] * x
    return y, state


def ssm_scan_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, state: torch.Tensor,
                  slots: torch.Tensor) -> torch.Tensor:
    """``scan_step`` of sequence i from ``state[slots[i]]`` (state: [slots, H, P,
    N] float32), written back there in place. Returns y [b, H, P] float32."""
    idx = slots.long()
    y, new = scan_step(x, dt, A, B, C, D, state.index_select(0, idx))
    state.index_copy_(0, idx, new)
    return y


def selective_scan_step(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """u, dt [b, inner], A [inner, N] float32, B, C [b, N]; state [slots, inner, N]
    float32, sequence i's at ``state[slots[i]]``, updated in place. Returns
    y [b, inner] in u's dtype (the state rounded to it before the product
    with C, as transformers' one-step update does)."""
    idx = slots.long()
    d = dt.float()[..., None]
    s = torch.exp(d * A) * state.index_select(0, idx) + d * B.float()[:, None, :] * u.float()[..., None]
    state.index_copy_(0, idx, s)
    return torch.matmul(s.to(u.dtype), C[..., None].to(u.dtype))[..., 0]
