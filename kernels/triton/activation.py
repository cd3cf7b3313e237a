"""SwiGLU gate: silu(gate) * up over rows of [gate | up]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_ndim

BLOCK_I = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # rounded to the input dtype before the multiply, as F.silu(gate) * up does
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding [gate | up] -> [T, I]; as ``splitserve.kernels.reference.silu_and_mul``."""
    op = "silu_and_mul"
    check_ndim(op, "x", x, 2, "[num_tokens, 2 * intermediate]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_last_dim_contiguous(op, "x", x)
    t, two_i = x.shape
    if two_i % 2:
        raise ValueError(f"{op}: last dim must be even ([gate | up]), got {two_i}")
    i = two_i // 2
    out = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t == 0 or i == 0:
        return out
    block = min(BLOCK_I, triton.next_power_of_2(i))
    _silu_and_mul_kernel[(t, triton.cdiv(i, block))](
        x, out, i, x.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out
