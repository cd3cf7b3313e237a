"""FP8-weight GEMMs: x [M, K] @ w8 [N, K]^T with scaled e4m3 weights.

Two launchers over one kernel, the contracts of ``splitserve.kernels.fp8_gemm``:

- ``fp8_w8a8_linear`` (GPUs with FP8 tensor cores, sm_89+): a first kernel
  quantizes each activation row to e4m3 with its own dynamic scale
  (``_quant_per_token_kernel``: amax, then round-to-nearest-even bytes, the
  same bytes as ``fp8_gemm.quantize_per_token``); the GEMM then multiplies
  fp8 by fp8 on the tensor cores with float32 accumulation.
- ``fp8_w8a16_linear`` (any GPU, and the interpreter): weights are decoded
  from their bytes in the kernel (integer bit arithmetic, exact, no sm_89
  conversion instruction) to the activations' dtype and multiplied there.

Scales: per-tensor and per-channel ones (group_k >= K) multiply the float32
accumulator once at the end; groups along K (128x128 blocks) multiply each
K tile's partial product, so BLOCK_K divides group_k and no tile straddles
two groups. The per-token activation scale multiplies the end result.
Weights and activations reach the kernels as raw bytes (uint8 views).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.fp8_gemm import FP8_WEIGHT_DTYPE, MIN_ACTIVATION_SCALE, scale_shape
from splitserve.kernels.triton._common import (FLOAT_DTYPES, check_device, check_dtype,
                                               check_last_dim_contiguous, check_ndim, dot_in_fp32,
                                               dot_precision, next_pow2)
from splitserve.kernels.triton.fp8_codec import decode_e4m3, encode_e4m3


@triton.jit
def _quant_per_token_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, stride_out,
                            MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program per row: x [M, K] float -> out [M, K] e4m3 bytes, scale [M]
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    # div_rn: IEEE division, as torch divides (Triton's default may be approximate)
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + k, encode_e4m3(tl.math.div_rn(x, scale)), mask=k < K)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, SCALE_EACH_K_TILE: tl.constexpr,
    ACT_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: [M, K] (e4m3 bytes when ACT_FP8, else float); w: [N, K] e4m3 bytes;
    # w_scale: [ceil(N/GROUP_N), ceil(K/GROUP_K)] float32; out: [M, N]
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + n.to(tl.int64)[None, :] * stride_wn
    s_rows = w_scale_ptr + (n // GROUP_N) * stride_sn  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0)  # [BM, BK]
        wb = tl.load(w_cols + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0)  # [BK, BN]
        if ACT_FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
            w = wb.to(tl.float8e4nv, bitcast=True)
        else:
            w = decode_e4m3(wb, 1.0)  # exact in float32, bfloat16 and float16
            if DOT_F32:
                a = a.to(tl.float32)
            else:
                w = w.to(a.dtype)
        if SCALE_EACH_K_TILE:
            s = tl.load(s_rows + k0 // GROUP_K, mask=nmask, other=0.0)
            acc += tl.dot(a, w, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if not SCALE_EACH_K_TILE:
        acc = acc * tl.load(s_rows, mask=nmask, other=0.0)[None, :]
    if ACT_FP8:
        acc = acc * tl.load(x_scale_ptr + m, mask=mmask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``splitserve.kernels.fp8_gemm.quantize_per_token`` (2-D x)."""
    check_ndim("quantize_per_token", "x", x, 2, "[tokens, features]")
    check_last_dim_contiguous("quantize_per_token", "x", x)
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(1024 if x.device.type == "cuda" else 256, next_pow2(max(k, 16)))
        _quant_per_token_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0),
                                      MIN_SCALE=MIN_ACTIVATION_SCALE, BLOCK_K=block)
    return out.view(FP8_WEIGHT_DTYPE), scale


def block_k_for(group_k: int, k: int, block_k: int) -> int:
    """The K tile: ``block_k``, halved until it divides group_k when scales
    change along K (so no tile straddles two scale groups)."""
    if group_k >= k:
        return block_k
    while block_k > 16 and group_k % block_k:
        block_k //= 2
    if group_k % block_k:
        raise ValueError(f"fp8 linear: group_k={group_k} must be a multiple of 16")
    return block_k


def tile_shape(m: int, fp8_dot: bool, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if not on_gpu:  # interpreter: small tiles keep numpy work per step small
        return 16, 32, 32, 4, 1
    block_m = min(128, max(16, next_pow2(m)))
    block_n = 64 if m <= 64 else 128
    block_k = 128 if fp8_dot else 64
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, warps, 4 if fp8_dot else 3


def _check_args(op, x, weight, weight_scale, group_n, group_k, bias) -> None:
    check_ndim(op, "x", x, 2, "[tokens, in_features]")
    check_ndim(op, "weight", weight, 2, "[out_features, in_features]")
    check_ndim(op, "weight_scale", weight_scale, 2, "[ceil(N / group_n), ceil(K / group_k)]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_dtype(op, "weight", weight, (FP8_WEIGHT_DTYPE, torch.uint8))
    check_dtype(op, "weight_scale", weight_scale, (torch.float32,))
    check_last_dim_contiguous(op, "x", x)
    check_last_dim_contiguous(op, "weight", weight)
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"{op}: x has {x.shape[1]} features, the weight {k}")
    if group_n <= 0 or group_k <= 0:
        raise ValueError(f"{op}: group sizes must be positive, got ({group_n}, {group_k})")
    if tuple(weight_scale.shape) != scale_shape(n, k, group_n, group_k):
        raise ValueError(f"{op}: weight_scale {tuple(weight_scale.shape)} does not fit a [{n}, {k}] "
                         f"weight in groups of ({group_n}, {group_k}): want "
                         f"{list(scale_shape(n, k, group_n, group_k))}")
    if weight_scale.stride(1) != 1 and weight_scale.shape[1] > 1:
        raise ValueError(f"{op}: weight_scale must have a unit stride in its last dim")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [{n}]")
    tensors = {"weight": weight, "weight_scale": weight_scale}
    if bias is not None:
        tensors["bias"] = bias
    check_device(op, x, **tensors)


def _gemm(op: str, x, weight, weight_scale, group_n, group_k, bias, act_fp8: bool) -> torch.Tensor:
    _check_args(op, x, weight, weight_scale, group_n, group_k, bias)
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    on_gpu = x.device.type == "cuda"
    block_m, block_n, block_k, warps, stages = tile_shape(m, act_fp8, on_gpu)
    block_k = block_k_for(group_k, k, block_k)
    x_scale = out  # unused unless act_fp8
    if act_fp8:
        x8, x_scale = quantize_per_token(x)
        xk = x8.view(torch.uint8)
    else:
        xk = x
    per_k_tile = group_k < k
    # one scale row (per-tensor): stride 0 and groups of 1 read it for every n,
    # and every per-tensor weight shares one compiled variant
    one_row = weight_scale.shape[0] == 1
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        xk, x_scale, weight.view(torch.uint8), weight_scale, bias if bias is not None else out, out,
        m, n, k,
        xk.stride(0), weight.stride(0), 0 if one_row else weight_scale.stride(0), out.stride(0),
        GROUP_N=1 if one_row else group_n, GROUP_K=group_k if per_k_tile else 1,
        SCALE_EACH_K_TILE=per_k_tile, ACT_FP8=act_fp8, HAS_BIAS=bias is not None,
        DOT_F32=not act_fp8 and dot_in_fp32(x), PRECISION=dot_precision(x) if not act_fp8 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def fp8_w8a16_linear(x, weight, weight_scale, group_n, group_k, bias=None):
    """Same contract as ``splitserve.kernels.fp8_gemm.fp8_w8a16_linear`` (2-D x)."""
    return _gemm("fp8_w8a16_linear", x, weight, weight_scale, group_n, group_k, bias, act_fp8=False)


def fp8_w8a8_linear(x, weight, weight_scale, group_n, group_k, bias=None):
    """Same contract as ``splitserve.kernels.fp8_gemm.fp8_w8a8_linear`` (2-D x).
    Compiled, it needs FP8 tensor cores (sm_89+); the interpreter runs it anywhere."""
    return _gemm("fp8_w8a8_linear", x, weight, weight_scale, group_n, group_k, bias, act_fp8=True)

