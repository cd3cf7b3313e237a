"""Gather a sequence's blocks over a layer range into one contiguous buffer
(``pack_kv``) and scatter such a buffer back (``unpack_kv``), one launch each.

kv_cache: [L, P, NB, BS, Hk, D]; buffer: [l, P, n, BS, Hk, D], P planes: 2
(keys, values) or 1 (multi-head latent attention's one latent for both).
Each program copies one slice of one (layer, plane, block) chunk of
BS*Hk*D elements. The
copy moves raw bits (elements reinterpreted as same-width integers), so every
cache dtype, fp8 included, is copied exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import INDEX_DTYPES, check_dtype, check_ndim

BLOCK = 2048  # elements per program: a quarter of a typical 16x8x128 chunk
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr,
    N, PLANES, CHUNK,
    stride_src_l, stride_src_kv, stride_src_b,
    stride_dst_l, stride_dst_kv, stride_dst_b,
    layer_off,
    GATHER: tl.constexpr, BLOCK: tl.constexpr,
):
    # program 0 axis: one (layer, plane, i) chunk; i indexes block_ids
    chunk = tl.program_id(0)
    i = (chunk % N).to(tl.int64)
    kv = ((chunk // N) % PLANES).to(tl.int64)
    layer = (chunk // N // PLANES).to(tl.int64)
    block = tl.load(ids_ptr + i).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < CHUNK
    if GATHER:  # cache -> buffer
        src = src_ptr + (layer + layer_off) * stride_src_l + kv * stride_src_kv + block * stride_src_b
        dst = dst_ptr + layer * stride_dst_l + kv * stride_dst_kv + i * stride_dst_b
    else:  # buffer -> cache
        src = src_ptr + layer * stride_src_l + kv * stride_src_kv + i * stride_src_b
        dst = dst_ptr + (layer + layer_off) * stride_dst_l + kv * stride_dst_kv + block * stride_dst_b
    tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


def _blocks_contiguous(t: torch.Tensor) -> bool:
    # the copy treats each [BS, Hk, D] block as one run of elements
    bs, hk, d = t.shape[3:]
    return (d <= 1 or t.stride(5) == 1) and (hk <= 1 or t.stride(4) == d) and (bs <= 1 or t.stride(3) == hk * d)


def _check_cache(op: str, kv_cache: torch.Tensor) -> None:
    check_ndim(op, "kv_cache", kv_cache, 6, "[num_layers, planes, num_blocks, block_size, num_kv_heads, head_dim]")
    if kv_cache.shape[1] not in (1, 2):
        raise ValueError(f"{op}: kv_cache dim 1 must be 2 (keys, values) or 1 (a latent for both), "
                         f"got {tuple(kv_cache.shape)}")
    if not _blocks_contiguous(kv_cache):
        raise ValueError(
            f"{op}: each cache block [BS, Hk, D] must be contiguous (strides {kv_cache.stride()})"
        )
    if kv_cache.element_size() not in _BITS_VIEW:
        raise ValueError(f"{op}: unsupported cache dtype {kv_cache.dtype}")


def _block_ids(op: str, block_ids: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    check_ndim(op, "block_ids", block_ids, 1, "[num_blocks_to_move]")
    check_dtype(op, "block_ids", block_ids, INDEX_DTYPES)
    if block_ids.device.type == "cpu" and block_ids.numel():
        # cheap to check here; on the GPU a check would cost a sync
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= kv_cache.shape[2]:
            raise ValueError(
                f"{op}: block ids must lie in [0, {kv_cache.shape[2]}), got range [{lo}, {hi}]"
            )
    return block_ids.to(kv_cache.device)


def _launch(src, dst, ids, n_layers, layer_off, gather: bool) -> None:
    n = ids.numel()
    chunk = src.shape[3] * src.shape[4] * src.shape[5]
    bits = _BITS_VIEW[src.element_size()]
    src, dst = src.view(bits), dst.view(bits)
    planes = src.shape[1]
    grid = (n_layers * planes * n, triton.cdiv(chunk, BLOCK))
    _copy_blocks_kernel[grid](
        src, dst, ids, n, planes, chunk,
        src.stride(0), src.stride(1), src.stride(2),
        dst.stride(0), dst.stride(1), dst.stride(2),
        layer_off, GATHER=gather, BLOCK=BLOCK, num_warps=4,
    )


def pack_kv(
    kv_cache: torch.Tensor,  # [L, P, NB, BS, Hk, D]
    block_ids: torch.Tensor,  # [n] int
    layer_start: int,
    layer_end: int,
) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.reference.pack_kv``: [l, P, n, BS, Hk, D]."""
    op = "pack_kv"
    _check_cache(op, kv_cache)
    if not 0 <= layer_start <= layer_end <= kv_cache.shape[0]:
        raise ValueError(
            f"{op}: layer range [{layer_start}, {layer_end}) is outside [0, {kv_cache.shape[0]}]"
        )
    ids = _block_ids(op, block_ids, kv_cache)
    n_layers = layer_end - layer_start
    _, planes, _, bs, hk, d = kv_cache.shape
    buf = torch.empty((n_layers, planes, ids.numel(), bs, hk, d), dtype=kv_cache.dtype, device=kv_cache.device)
    if buf.numel():
        _launch(kv_cache, buf, ids, n_layers, layer_start, gather=True)
    return buf


def unpack_kv(
    buf: torch.Tensor,  # [l, P, n, BS, Hk, D]
    kv_cache: torch.Tensor,  # [L, P, NB, BS, Hk, D]
    block_ids: torch.Tensor,  # [n] int
    layer_start: int,
) -> None:
    """Same contract as ``splitserve.kernels.reference.unpack_kv`` (in place)."""
    op = "unpack_kv"
    _check_cache(op, kv_cache)
    ids = _block_ids(op, block_ids, kv_cache)
    check_ndim(op, "buf", buf, 6, "[num_layers, planes, num_blocks, block_size, num_kv_heads, head_dim]")
    n_layers = buf.shape[0]
    expected = (n_layers, kv_cache.shape[1], ids.numel(), *kv_cache.shape[3:])
    if tuple(buf.shape) != expected:
        raise ValueError(f"{op}: buf {tuple(buf.shape)} must be {expected} for {ids.numel()} block ids")
    if layer_start < 0 or layer_start + n_layers > kv_cache.shape[0]:
        raise ValueError(
            f"{op}: layers [{layer_start}, {layer_start + n_layers}) exceed the cache's "
            f"{kv_cache.shape[0]} layers"
        )
    # a buffer received over the network may sit on the host or hold another dtype
    buf = buf.to(kv_cache.device, kv_cache.dtype)
    if buf.numel() == 0:
        return
    if not _blocks_contiguous(buf):
        buf = buf.contiguous()
    _launch(buf, kv_cache, ids, n_layers, layer_start, gather=False)
