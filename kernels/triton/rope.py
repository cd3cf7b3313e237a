"""Neox-style rotary embedding applied in place to q and k.

One program per token rotates all of its query and key heads, so the token's
cos/sin row is read once. Rounded like the reference: cos and sin to q's
dtype, then each product and the sum (transformers' order on 16-bit
tensors); nothing is rounded in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import (FLOAT_DTYPES, INDEX_DTYPES, check_device, check_dtype,
                                               check_last_dim_contiguous, check_ndim, next_pow2)
from splitserve.kernels.triton.rounding import round_as


@triton.jit
def _rotate_heads(ptr, stride_t, stride_h, tok, H, cos, sin, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # cos, sin: [1, BLOCK_HALF] fp32; rotates x[tok, :H, :] in place
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    p1 = ptr + tok * stride_t + heads * stride_h + cols
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    dt: tl.constexpr = x1.dtype
    c = round_as(cos, dt)
    s = round_as(sin, dt)
    o1 = round_as(round_as(x1f * c, dt) - round_as(x2f * s, dt), dt)
    o2 = round_as(round_as(x2f * c, dt) + round_as(x1f * s, dt), dt)
    tl.store(p1, o1.to(x1.dtype), mask=mask)
    tl.store(p2, o2.to(x2.dtype), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    HQ, HK, HALF,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < HALF
    # cache row: [cos (HALF) | sin (HALF)]
    cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, HQ, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, tok, HK, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``splitserve.kernels.reference.rotary_embedding`` (in place)."""
    op = "rotary_embedding"
    check_ndim(op, "q", q, 3, "[num_tokens, num_heads, head_dim]")
    check_ndim(op, "k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_ndim(op, "positions", positions, 1, "[num_tokens]")
    check_ndim(op, "cos_sin_cache", cos_sin_cache, 2, "[max_position, head_dim]")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or positions.shape[0] != t:
        raise ValueError(
            f"{op}: positions {tuple(positions.shape)}, q {tuple(q.shape)} and k {tuple(k.shape)} "
            "must agree on num_tokens and head_dim"
        )
    if d % 2:
        raise ValueError(f"{op}: head_dim must be even, got {d}")
    if cos_sin_cache.shape[1] != d:
        raise ValueError(
            f"{op}: cos_sin_cache width {cos_sin_cache.shape[1]} must equal head_dim {d} "
            "(cos in the first half, sin in the second)"
        )
    check_dtype(op, "q", q, FLOAT_DTYPES)
    check_dtype(op, "k", k, FLOAT_DTYPES)
    check_dtype(op, "positions", positions, INDEX_DTYPES)
    check_dtype(op, "cos_sin_cache", cos_sin_cache, FLOAT_DTYPES)
    check_device(op, q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    for name, x in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(op, name, x)
    if t == 0:
        return q, k
    half = d // 2
    _rotary_embedding_kernel[(t,)](
        positions, q, k, cos_sin_cache,
        hq, k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
        num_warps=4,
    )
    return q, k
