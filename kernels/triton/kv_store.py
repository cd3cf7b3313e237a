"""Scatter a step's new keys and values into their paged-cache slots.

One program per token writes all of its kv heads for both K and V. A slot of
-1 (padding) stores nothing. FP8 caches store ``value / scale`` rounded to
e4m3 (see ``fp8_codec``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    as_kernel_cache,
    check_cache_pair,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_ndim,
    is_fp8,
    next_pow2,
)
from splitserve.kernels.triton.fp8_codec import encode_e4m3


@triton.jit
def _store_one(src_ptr, dst_ptr, stride_st, stride_sh, tok, dst_off, stride_ch, HK, D, scale,
               FP8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < HK) & (cols < D)
    x = tl.load(src_ptr + tok * stride_st + heads * stride_sh + cols, mask=mask, other=0.0)
    if FP8:
        y = encode_e4m3(tl.math.div_rn(x.to(tl.float32), scale))
    else:
        y = x.to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + dst_off + heads * stride_ch + cols, y, mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    HK, D, BS, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    FP8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return  # padding token
    dst_off = (slot // BS) * stride_cb + (slot % BS) * stride_cs
    _store_one(key_ptr, k_cache_ptr, stride_kt, stride_kh, tok, dst_off, stride_ch, HK, D, k_scale,
               FP8, BLOCK_H, BLOCK_D)
    _store_one(value_ptr, v_cache_ptr, stride_vt, stride_vh, tok, dst_off, stride_ch, HK, D, v_scale,
               FP8, BLOCK_H, BLOCK_D)


def store_kv(
    key: torch.Tensor,  # [T, Hk, D]
    value: torch.Tensor,  # [T, Hk, D]
    k_cache: torch.Tensor,  # [NB, BS, Hk, D]
    v_cache: torch.Tensor,  # [NB, BS, Hk, D]
    slot_mapping: torch.Tensor,  # [T] int, -1 = skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Same contract as ``splitserve.kernels.reference.store_kv`` (in place)."""
    op = "store_kv"
    check_cache_pair(op, k_cache, v_cache)
    nb, bs, hk, d = k_cache.shape
    for name, x in (("key", key), ("value", value)):
        check_ndim(op, name, x, 3, "[num_tokens, num_kv_heads, head_dim]")
        if x.shape[1:] != (hk, d):
            raise ValueError(f"{op}: {name} {tuple(x.shape)} must be [T, {hk}, {d}] to match the cache")
        check_dtype(op, name, x, FLOAT_DTYPES)
        check_last_dim_contiguous(op, name, x)
    check_ndim(op, "slot_mapping", slot_mapping, 1, "[num_tokens]")
    check_dtype(op, "slot_mapping", slot_mapping, INDEX_DTYPES)
    t = key.shape[0]
    if value.shape[0] != t or slot_mapping.shape[0] != t:
        raise ValueError(
            f"{op}: key {tuple(key.shape)}, value {tuple(value.shape)} and slot_mapping "
            f"{tuple(slot_mapping.shape)} must have the same number of tokens"
        )
    check_device(op, key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    fp8 = is_fp8(k_cache)
    if fp8 and (k_scale <= 0 or v_scale <= 0):
        raise ValueError(f"{op}: fp8 scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")
    if t == 0:
        return
    kc, vc = as_kernel_cache(k_cache), as_kernel_cache(v_cache)
    _store_kv_kernel[(t,)](
        key, value, kc, vc, slot_mapping,
        hk, d, bs, float(k_scale), float(v_scale),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        FP8=fp8, BLOCK_H=next_pow2(hk), BLOCK_D=next_pow2(d),
        num_warps=4,
    )
