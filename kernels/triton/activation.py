"""Gated activations over rows of [gate | up]: SwiGLU (silu(gate) * up) and
GeGLU with the tanh approximation of GELU (gelu_tanh(gate) * up, Gemma's)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_ndim

BLOCK_I = 1024


SILU, GELU_TANH = 0, 1
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_out, ACT: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    else:  # tanh(z) = 1 - 2 / (exp(2z) + 1): exact at both saturations (exp -> 0 or inf)
        z = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    # rounded to the input dtype before the multiply, as F.silu(gate) * up does
    act = a.to(gate.dtype)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding [gate | up] -> [T, I]; as ``splitserve.kernels.reference.silu_and_mul``."""
    return _act_and_mul("silu_and_mul", x, SILU)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding [gate | up] -> [T, I]; as
    ``splitserve.kernels.reference.gelu_tanh_and_mul``."""
    return _act_and_mul("gelu_tanh_and_mul", x, GELU_TANH)


def _act_and_mul(op: str, x: torch.Tensor, act: int) -> torch.Tensor:
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
    _act_and_mul_kernel[(t, triton.cdiv(i, block))](
        x, out, i, x.stride(0), out.stride(0), ACT=act, BLOCK=block, num_warps=4
    )
    return out
