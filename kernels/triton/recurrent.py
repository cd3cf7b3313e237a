"""The recurrent layers' decode steps (``splitserve.kernels.recurrent``),
each one kernel that reads a sequence's state from its slot once and
writes it back in place (the torch references make four or five passes
over it). Inputs and states are float32, as the references'.

- ``gated_delta_step``: one program per (sequence, value head, block of
  BLOCK_V value columns): each value column of a state evolves on its own
  given k and q, so a program decays its [Dk, BLOCK_V] slice (by one gate
  per head, or one per key channel: Kimi Delta Attention), applies the
  correction (none without beta: lightning attention) and reads the output;
- ``ssm_scan_step`` (Mamba-2): one program per (sequence, head, block of
  BLOCK_P rows of the head dim): each row of a [P, N] state evolves on its
  own given dt, B and C;
- ``selective_scan_step`` (Mamba-1): one program per (sequence, block of
  BLOCK_D channels): each channel's [N] state row evolves on its own. Its
  output is summed in float32 and rounded once to u's dtype (the torch
  reference rounds the state first, as transformers' one-step update
  does: bf16 results differ by that rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import next_pow2


def _check(op: str, shapes_match: bool, tensors: dict[str, torch.Tensor], state: torch.Tensor,
           row: int) -> None:
    """Raise ValueError unless the shapes match and ``state`` is float32 with
    rows of ``row`` contiguous values."""
    if not shapes_match:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        raise ValueError(f"{op}: shapes {shapes} do not match")
    if state.dtype != torch.float32 or state.stride(-1) != 1 or state.stride(-2) != row:
        raise ValueError(f"{op}: the state must be float32 with contiguous rows of {row}, got "
                         f"{state.dtype} strides {state.stride()}")


@triton.jit
def _gated_delta_step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, slots_ptr, out_ptr,
    DK, DV,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    stride_gb, stride_gh, stride_bb, stride_bh,
    stride_ss, stride_sh, stride_sk,
    stride_ob, stride_oh,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, G_PER_KEY: tl.constexpr,
    HAS_BETA: tl.constexpr,
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
    s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + kk[:, None] * stride_sk + vv[None, :]
    smask = kmask[:, None] & vmask[None, :]
    s = tl.load(s_ptrs, mask=smask, other=0.0)
    if G_PER_KEY:  # Kimi Delta Attention: each key channel's row decays on its own
        g = tl.load(g_ptr + b * stride_gb + h * stride_gh + kk, mask=kmask, other=0.0).to(tl.float32)
        s = s * tl.exp(g)[:, None]
    else:
        s = s * tl.exp(tl.load(g_ptr + b * stride_gb + h * stride_gh).to(tl.float32))
    if HAS_BETA:  # the delta rule's correction
        beta = tl.load(beta_ptr + b * stride_bb + h * stride_bh).to(tl.float32)
        u = (v - tl.sum(s * k[:, None], 0)) * beta  # [BLOCK_V]
    else:  # linear attention with a decay (lightning attention)
        u = v
    s = s + k[:, None] * u[None, :]
    tl.store(s_ptrs, s, mask=smask)
    o = tl.sum(s * q[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + vv, o, mask=vmask)


def gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.recurrent.gated_delta_step``."""
    b, h, dk = k.shape
    dv = v.shape[-1]
    per_key, has_beta = g.dim() == 3, beta is not None
    _check("gated_delta_step", tuple(state.shape[1:]) == (h, dk, dv) and q.shape == k.shape
           and slots.shape == (b,) and tuple(g.shape) in ((b, h), (b, h, dk)),
           dict(q=q, k=k, v=v, g=g, state=state, slots=slots), state, dv)
    out = torch.empty((b, h, dv), dtype=torch.float32, device=q.device)
    if b == 0:
        return out
    q, k, v, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, g))
    beta = beta if has_beta else g  # never read
    block_k = max(16, next_pow2(dk))
    block_v = min(max(16, next_pow2(dv)), 64 if q.device.type == "cuda" else 32)
    _gated_delta_step_kernel[(b, h, triton.cdiv(dv, block_v))](
        q, k, v, g, beta, state, slots, out, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), g.stride(1), beta.stride(0), beta.stride(1),
        state.stride(0), state.stride(1), state.stride(2), out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_V=block_v, G_PER_KEY=per_key, HAS_BETA=has_beta, num_warps=4,
    )
    return out


@triton.jit
def _ssm_scan_step_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, state_ptr, slots_ptr, y_ptr,
    P, N,
    stride_xb, stride_xh, stride_dtb, stride_dth, stride_bb, stride_bh, stride_cb, stride_ch,
    stride_ss, stride_sh, stride_sp,
    stride_yb, stride_yh,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < P
    nmask = nn < N
    slot = tl.load(slots_ptr + b).to(tl.int64)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + pp, mask=pmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dtb + h * stride_dth).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)
    d = tl.load(d_ptr + h).to(tl.float32)
    bv = tl.load(b_ptr + b * stride_bb + h * stride_bh + nn, mask=nmask, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b * stride_cb + h * stride_ch + nn, mask=nmask, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + pp[:, None] * stride_sp + nn[None, :]
    smask = pmask[:, None] & nmask[None, :]
    s = tl.load(s_ptrs, mask=smask, other=0.0) * tl.exp(dt * a) + (dt * x)[:, None] * bv[None, :]
    tl.store(s_ptrs, s, mask=smask)
    y = tl.sum(s * cv[None, :], 1) + d * x
    tl.store(y_ptr + b * stride_yb + h * stride_yh + pp, y, mask=pmask)


def ssm_scan_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, D: torch.Tensor, state: torch.Tensor,
                  slots: torch.Tensor) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.recurrent.ssm_scan_step``."""
    b, h, p = x.shape
    n = B.shape[-1]
    _check("ssm_scan_step", tuple(state.shape[1:]) == (h, p, n) and B.shape == C.shape
           and B.shape[:2] == (b, h) and slots.shape == (b,) and A.shape == (h,)
           and D.shape == (h,), dict(x=x, B=B, C=C, state=state, slots=slots), state, n)
    y = torch.empty((b, h, p), dtype=torch.float32, device=x.device)
    if b == 0:
        return y
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    A, D = A.contiguous(), D.contiguous()
    block_n = max(16, next_pow2(n))
    block_p = min(max(16, next_pow2(p)), 32)
    _ssm_scan_step_kernel[(b, h, triton.cdiv(p, block_p))](
        x, dt, A, B, C, D, state, slots, y, p, n,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), state.stride(0), state.stride(1), state.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4,
    )
    return y


@triton.jit
def _selective_scan_step_kernel(
    u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, state_ptr, slots_ptr, y_ptr,
    INNER, N,
    stride_ub, stride_dtb, stride_ad, stride_bb, stride_cb,
    stride_ss, stride_sd, stride_yb,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    dmask = dd < INNER
    nmask = nn < N
    slot = tl.load(slots_ptr + b).to(tl.int64)
    u = tl.load(u_ptr + b * stride_ub + dd, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dtb + dd, mask=dmask, other=0.0).to(tl.float32)
    smask = dmask[:, None] & nmask[None, :]
    a = tl.load(a_ptr + dd[:, None] * stride_ad + nn[None, :], mask=smask, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + b * stride_bb + nn, mask=nmask, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b * stride_cb + nn, mask=nmask, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + dd[:, None] * stride_sd + nn[None, :]
    s = tl.exp(dt[:, None] * a) * tl.load(s_ptrs, mask=smask, other=0.0) \
        + (dt * u)[:, None] * bv[None, :]
    tl.store(s_ptrs, s, mask=smask)
    y = tl.sum(s * cv[None, :], 1)
    tl.store(y_ptr + b * stride_yb + dd, y.to(y_ptr.dtype.element_ty), mask=dmask)


def selective_scan_step(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor, state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.recurrent.selective_scan_step``."""
    b, inner = u.shape
    n = B.shape[-1]
    _check("selective_scan_step", tuple(state.shape[1:]) == (inner, n) and dt.shape == u.shape
           and A.shape == (inner, n) and B.shape == C.shape == (b, n) and slots.shape == (b,),
           dict(u=u, dt=dt, A=A, B=B, C=C, state=state, slots=slots), state, n)
    y = torch.empty((b, inner), dtype=u.dtype, device=u.device)
    if b == 0:
        return y
    u, dt, A, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, dt, A, B, C))
    block_n = max(16, next_pow2(n))
    block_d = 32 if block_n <= 64 else 16
    _selective_scan_step_kernel[(b, triton.cdiv(inner, block_d))](
        u, dt, A, B, C, state, slots, y, inner, n,
        u.stride(0), dt.stride(0), A.stride(0), B.stride(0), C.stride(0),
        state.stride(0), state.stride(1), y.stride(0),
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return y
