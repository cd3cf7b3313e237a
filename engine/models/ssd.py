"""The selective state-space scan of Mamba-2 layers, in torch over float32,
for one sequence's chunk or a batch of single tokens.

Per head h, with a scalar A_h < 0, a [head_dim, state_size] state S and
per token a step dt_t > 0, an input x_t [head_dim] and B_t, C_t
[state_size] (those of the head's group):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T
    y_t = S_t C_t + D_h x_t

A prompt runs in chunks of ``CHUNK`` tokens (the state-space duality
form). Within a chunk whose start state is S0, with c_t the cumulative sum
of dt A through token t (so exp(c_t - c_s) decays token s's write until
token t):

    y_t = exp(c_t) S0 C_t + sum_{s <= t} exp(c_t - c_s) (C_t . B_s) dt_s x_s + D x_t
    S_end = exp(c_end) S0 + sum_s exp(c_end - c_s) dt_s x_s B_s^T

A decode step of the whole batch runs ``ops.ssm_scan_step`` (in place on the
state slots: one Triton kernel on GPUs); ``kernels.recurrent.scan_step`` is its
torch form on gathered states (verify steps, single tokens inside mixed batches).
"""

from __future__ import annotations

import torch

CHUNK = 64  # tokens per chunk of a prompt


def heads_of_groups(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., groups, N] B or C -> [..., heads, N]: each group serves
    ``num_heads // groups`` consecutive heads."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's tokens: x [n, H, P], dt [n, H], A and D [H], B and C
    [n, H, N], state [H, P, N] before them -> (y [n, H, P], the state after)."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        out[rows], state = _chunk(x[rows], dt[rows], A, B[rows], C[rows], state)
    return out + D[:, None] * x, state


def _chunk(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan over one chunk (without the D skip), from ``state``."""
    n = x.shape[0]
    c = torch.cumsum(dt * A, dim=0)  # [n, H], non-increasing
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    gap = (c[:, None, :] - c[None, :, :]).masked_fill(~causal[..., None], float("-inf"))  # [t, s, H]
    weights = torch.exp(gap) * torch.einsum("thn,shn->tsh", C, B)
    xdt = x * dt[..., None]
    y = torch.einsum("tsh,shp->thp", weights, xdt)
    y = y + torch.exp(c)[..., None] * torch.einsum("thn,hpn->thp", C, state)
    to_end = torch.exp(c[-1:] - c)  # [n, H]
    state = state * torch.exp(c[-1])[:, None, None] + torch.einsum("sh,shp,shn->hpn", to_end, xdt, B)
    return y, state
