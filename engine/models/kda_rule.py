"""The gated delta rule of Kimi Delta Attention (Kimi Linear's KDA layers):
Gated DeltaNet's rule (``splitserve.engine.models.delta_rule``) with a decay
per key channel instead of one per head, in torch over float32, for one
sequence's chunk or a batch of single tokens.

Per head, with a [k dim, v dim] state S carried across tokens and g_t the
[k dim] log-decays of token t:

    S' = diag(exp(g_t)) S_{t-1}
    u_t = beta_t (v_t - S'^T k_t)
    S_t = S' + k_t u_t^T
    o_t = S_t^T q_t

``q`` and ``k`` come L2-normalised per head, ``q`` scaled by 1/sqrt(k dim)
(``delta_rule.normalize_qk``).

A prompt runs in chunks of ``CHUNK`` tokens. Unrolled within a chunk whose
start state is S0, with cum_i the cumulative log-decays from the chunk start
through token i (a [k dim] vector), and D_ij = exp(cum_i - cum_j) (<= 1 for
j <= i, so never overflowing):

    (I + B L) U = B V - B (exp(cum) * K) S0,   L[i, j] = sum_d k_i[d] D_ij[d] k_j[d] (j < i)
    O = (exp(cum) * Q) S0 + M U,               M[i, j] = sum_d q_i[d] D_ij[d] k_j[d] (j <= i)
    S_C = diag(exp(cum_C)) S0 + sum_j (D_Cj * k_j) u_j^T

with B = diag(beta); U = W - Kc S0, W and Kc solved from the unit lower
triangular system without S0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.recurrent import rule_step

CHUNK = 32  # tokens per chunk of a prompt (each chunk holds a [H, C, C, k dim] decay tensor)


# One token of each of B sequences: q, k, g [B, H, Dk], v [B, H, Dv], beta [B, H]
# (float32), state [B, H, Dk, Dv] float32 -> (o [B, H, Dv], the new state): the gated
# delta rule with a decay per key channel. A decode step of the whole batch runs
# ``ops.gated_delta_step`` instead (in place on the state slots: one Triton kernel on
# GPUs).
recurrent_step = rule_step


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's n tokens: q, k, g [n, H, Dk], v [n, H, Dv], beta [n, H]
    (float32), state [H, Dk, Dv] float32. Returns (o [n, H, Dv], the state
    after the last token)."""
    n = q.shape[0]
    pad = -n % CHUNK
    if pad:  # zero tokens: no correction (beta 0), no decay (g 0)
        q, k, v, g, beta = (F.pad(x, (0,) * (2 * (x.dim() - 1)) + (0, pad)) for x in (q, k, v, g, beta))
    # [H, n + pad, ...]
    q, k, v, g = (x.transpose(0, 1) for x in (q, k, v, g))
    beta = beta.t()
    eye = torch.eye(CHUNK, dtype=q.dtype, device=q.device)
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    outs = []
    s = state
    for start in range(0, n + pad, CHUNK):
        rows = slice(start, start + CHUNK)
        qc, kc, vc, bc = q[:, rows], k[:, rows], v[:, rows], beta[:, rows]
        cum = g[:, rows].cumsum(1)  # [H, C, Dk]
        diff = cum[:, :, None, :] - cum[:, None, :, :]  # [H, C (i), C (j), Dk]
        decay = diff.masked_fill(~lower[..., None], float("-inf")).exp()
        kk = torch.einsum("hid,hijd,hjd->hij", kc, decay, kc)
        qk = torch.einsum("hid,hijd,hjd->hij", qc, decay, kc)
        system = eye + bc[..., None] * kk.tril(-1)
        rhs = torch.cat([bc[..., None] * vc, bc[..., None] * cum.exp() * kc], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        w, kcum = solved[..., :vc.shape[-1]], solved[..., vc.shape[-1]:]
        u = w - kcum @ s
        outs.append((cum.exp() * qc) @ s + qk @ u)
        tail = (cum[:, -1:] - cum).exp() * kc  # (D_Cj * k_j), [H, C, Dk]
        s = s * cum[:, -1, :, None].exp() + tail.transpose(-1, -2) @ u
    return torch.cat(outs, dim=1).transpose(0, 1)[:n], s
