"""The gated delta rule of Gated DeltaNet layers (Qwen3-Next, Qwen3.5), in
torch over float32, for one sequence's chunk or a batch of single tokens.

Per value head, with a [k dim, v dim] state S carried across tokens: each
token decays S by exp(g), writes the correction beta * (v - S^T k) along k,
and reads q^T S:

    S' = exp(g_t) S_{t-1}
    u_t = beta_t (v_t - S'^T k_t)
    S_t = S' + k_t u_t^T
    o_t = S_t^T q_t

``q`` and ``k`` are L2-normalised per head here and ``q`` scaled by
1/sqrt(k dim), as transformers' ``use_qk_l2norm_in_kernel`` does.

A prompt runs in chunks of ``CHUNK`` tokens. Unrolled within a chunk whose
start state is S0, with G_i the decay from the chunk start through token i
(exp of the cumulative sum of g), the corrections solve a unit lower
triangular system (I + B L) U = B V - B G K S0, L[i, j] = (G_i / G_j) k_i.k_j
for j < i, B = diag(beta); so U = W - Kc S0 with W and Kc independent of
S0, computed for every chunk at once; then per chunk in turn
O = G Q S0 + (M * Q K^T) U with M[i, j] = G_i / G_j (j <= i), and the end
state G_C S0 + ((G_C / G) K)^T U.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.recurrent import rule_step

CHUNK = 64  # tokens per chunk of a prompt


def normalize_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float32 q and k L2-normalised over D (eps 1e-6 under the root, as
    the reference kernels), q then scaled by 1/sqrt(D)."""
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q * q.shape[-1] ** -0.5, k


# One token of each of B sequences: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H]
# (normalised, float32), state [B, H, Dk, Dv] float32 -> (o [B, H, Dv], the new
# state). A decode step of the whole batch runs ``ops.gated_delta_step`` instead (in
# place on the state store's slots: one Triton kernel on GPUs).
recurrent_step = rule_step


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's n tokens: q, k [n, H, Dk], v [n, H, Dv], g, beta [n, H]
    (normalised, float32), state [H, Dk, Dv] float32. Returns (o [n, H, Dv],
    the state after the last token)."""
    n, h, dk = k.shape
    dv = v.shape[-1]
    pad = -n % CHUNK
    if pad:  # zero tokens: no correction (beta 0), no decay (g 0)
        q, k, v, g, beta = (F.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, pad)) for x in (q, k, v, g, beta))
    c = (n + pad) // CHUNK
    # [H, chunks, CHUNK, ...]
    q, k, v = (x.reshape(c, CHUNK, h, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    g, beta = (x.reshape(c, CHUNK, h).permute(2, 0, 1) for x in (g, beta))
    cum = g.cumsum(-1)  # log G within each chunk
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    diff = cum[..., :, None] - cum[..., None, :]  # log(G_i / G_j)
    ratio = diff.masked_fill(~lower, float("-inf")).exp()  # M: 0 above the diagonal
    kk = k @ k.transpose(-1, -2)
    system = torch.eye(CHUNK, dtype=q.dtype, device=q.device) + beta[..., None] * kk * ratio.tril(-1)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * cum.exp()[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w, kc = solved[..., :dv], solved[..., dv:]
    qk = (q @ k.transpose(-1, -2)) * ratio
    q_decayed = q * cum.exp()[..., None]
    tail = (cum[..., -1:] - cum).exp()[..., None] * k  # (G_C / G_j) k_j
    end = cum[..., -1].exp()  # G_C per chunk
    out = torch.empty(h, c, CHUNK, dv, dtype=q.dtype, device=q.device)
    s = state
    for i in range(c):
        u = w[:, i] - kc[:, i] @ s
        out[:, i] = q_decayed[:, i] @ s + qk[:, i] @ u
        s = s * end[:, i, None, None] + tail[:, i].transpose(-1, -2) @ u
    return out.permute(1, 2, 0, 3).reshape(c * CHUNK, h, dv)[:n], s
