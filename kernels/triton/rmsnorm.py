"""RMSNorm with an optional fused residual add: one program per token row.

Rounding follows ``splitserve.kernels.reference.rms_norm`` step by step (the residual
sum rounded to x.dtype; the normalised row rounded to x.dtype before the
weight multiply, or, with FP32_PRODUCT, multiplied in float32 and the
product rounded once) so 16-bit outputs match the reference, not just
approximate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import (FLOAT_DTYPES, check_device, check_dtype,
                                               check_last_dim_contiguous, check_ndim, next_pow2)
from splitserve.kernels.triton.rounding import round_as


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    D, eps,
    stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr,
    FP32_PRODUCT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = round_as(x.to(tl.float32) + r.to(tl.float32), x.dtype).to(x.dtype)  # the new residual stream
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / D
    normed = xf * tl.rsqrt(var + eps)
    if not FP32_PRODUCT:
        normed = round_as(normed, x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_out + cols, round_as(y, out_dtype).to(out_dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, D]
    fp32_product: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``splitserve.kernels.reference.rms_norm``."""
    op = "rms_norm"
    check_ndim(op, "x", x, 2, "[num_tokens, hidden]")
    t, d = x.shape
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, FLOAT_DTYPES)
    if weight.shape != (d,):
        raise ValueError(f"{op}: weight must be [{d}] to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    check_device(op, x, weight=weight)
    check_last_dim_contiguous(op, "x", x)
    weight = weight.contiguous()
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
        check_dtype(op, "residual", residual, FLOAT_DTYPES)
        check_device(op, x, residual=residual)
        check_last_dim_contiguous(op, "residual", residual)
    # weight * norm(x) in the reference promotes like any torch multiply; the
    # float32 product is rounded to x.dtype
    out_dtype = x.dtype if fp32_product else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((t, d), dtype=out_dtype, device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if t == 0:
        return out, res_out
    block_d = next_pow2(d)
    res_in = residual if residual is not None else x
    res_buf = res_out if res_out is not None else out
    _rms_norm_kernel[(t,)](
        x, res_in, weight, out, res_buf,
        d, float(eps),
        x.stride(0), res_in.stride(0), out.stride(0), res_buf.stride(0),
        HAS_RESIDUAL=residual is not None,
        FP32_PRODUCT=fp32_product,
        BLOCK_D=block_d,
        num_warps=min(16, max(1, block_d // 256)),
    )
    return out, res_out
