"""The gated delta rule's decode step (``splitserve.kernels.recurrent``) in
one kernel: one program per (sequence, value head, block of BLOCK_V value
columns). Each value column of a state evolves on its own given k and q, so
a program loads its [Dk, BLOCK_V] slice of the sequence's slot once,
decays it, applies the correction, reads the output and stores it back in
place: the state crosses memory twice per step (the torch reference makes
five passes). Inputs and the state are float32, as the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import next_pow2


@triton.jit
def _gated_delta_step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, slots_ptr, out_ptr,
    DK, DV,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_gb, stride_gh, stride_bb, stride_bh,
    stride_ss, stride_sh, stride_sk,
    stride_ob, stride_oh,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    vv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    kmask = kk < DK
    vmask = vv < DV
    slot = tl.load(slots_ptr + b).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + kk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + kk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + vv, mask=vmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * stride_gb + h * stride_gh).to(tl.float32)
    beta = tl.load(beta_ptr + b * stride_bb + h * stride_bh).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + kk[:, None] * stride_sk + vv[None, :]
    smask = kmask[:, None] & vmask[None, :]
    s = tl.load(s_ptrs, mask=smask, other=0.0) * tl.exp(g)
    u = (v - tl.sum(s * k[:, None], 0)) * beta  # [BLOCK_V]
    s = s + k[:, None] * u[None, :]
    tl.store(s_ptrs, s, mask=smask)
    o = tl.sum(s * q[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + vv, o, mask=vmask)


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.recurrent.gated_delta_step``."""
    b, h, dk = k.shape
    dv = v.shape[-1]
    if state.dtype != torch.float32 or state.stride(-1) != 1 or state.stride(-2) != dv:
        raise ValueError("gated_delta_step: the state must be float32 with contiguous "
                         f"[Dk, Dv] rows, got {state.dtype} strides {state.stride()}")
    if tuple(state.shape[1:]) != (h, dk, dv) or q.shape != k.shape or slots.shape != (b,):
        raise ValueError(f"gated_delta_step: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, state {tuple(state.shape)}, slots "
                         f"{tuple(slots.shape)} do not match")
    out = torch.empty((b, h, dv), dtype=torch.float32, device=q.device)
    if b == 0:
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    block_k = max(16, next_pow2(dk))
    block_v = min(max(16, next_pow2(dv)), 64 if q.device.type == "cuda" else 32)
    _gated_delta_step_kernel[(b, h, triton.cdiv(dv, block_v))](
        q, k, v, g, beta, state, slots, out, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
        state.stride(0), state.stride(1), state.stride(2), out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_V=block_v, num_warps=4,
    )
    return out
