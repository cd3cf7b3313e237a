"""Paged attention for the decode step (one query token per sequence),
split-K / flash-decoding.

Kernel 1 runs one program per (sequence, kv head, KV split): it processes all
query heads that share the kv head together (GQA: K/V are read once per
group) over its slice of the context and writes partial max, denominator and
unnormalised output. Heads wider than 256 (multi-head latent attention's
576-wide latent under up to 128 query heads, Gemma 4's 512) take at most 16
query heads per program (``heads_per_program``: the kv head's tiles are read
once per 16) and 32-token tiles, so a program's tiles fit shared memory. Kernel 2 merges the splits. With a single split the
first kernel writes the normalised output itself.

The grid depends only on tensor shapes (the split count is planned from the
block table's width, never from context_lens' values): no host sync, so the
launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import (
    as_kernel_cache,
    heads_per_program,
    check_alibi_slopes,
    check_paged_attention_args,
    dot_in_fp32,
    dot_precision,
    is_fp8,
    next_pow2,
    num_sms,
)
from splitserve.kernels.triton.paged_tile import (
    alibi_tile,
    attend_tile,
    paged_token_offsets,
    score_scale,
    sink_args,
    sink_init,
)

MIN_TILES_PER_SPLIT = 4  # below this the merge costs more than the split saves
GPU_BLOCK_N = 64  # KV tokens per tile
WIDE_GPU_BLOCK_N = 32  # ... for heads wider than 256 (MLA's 576-wide latent, Gemma 4's 512)
CPU_BLOCK_N = 16  # interpreter: small tiles, so short test contexts still span several


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, m_ptr, l_ptr, acc_ptr,
    scale_log2, k_scale, v_scale, window, softcap, sinks_ptr,
    HQ, G, GH, HB, D, BS, NUM_SPLITS, split_len,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt, alibi_ptr,
    FP8_KV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // HB  # HB programs per kv head, GH of its G query heads each
    hb = tl.program_id(1) % HB
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    if HAS_WINDOW:  # only the latest ``window`` tokens: splits before them stay empty
        start = tl.maximum(start, ctx - window)

    g = hb * GH + tl.arange(0, BLOCK_G)  # this program's heads among the kv head's G
    d = tl.arange(0, BLOCK_D)
    gmask = (tl.arange(0, BLOCK_G) < GH) & (g < G)
    dmask = d < D
    heads = kv_head * G + g  # [BLOCK_G] query heads of this kv head
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    slope = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:  # each query head's ALiBi slope
        slope = tl.load(alibi_ptr + heads, mask=gmask, other=0.0)
    pos = tl.zeros([BLOCK_G], tl.int32) + (ctx - 1)  # the decoded token's position

    if HAS_SINKS:  # the sinks join the first split's state, so the merge counts them once
        m_i, l_i = sink_init(sinks_ptr, heads, gmask, split == 0, BLOCK_G)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        tok_off = paged_token_offsets(bt_row, n, nmask, kv_head, BS, stride_cb, stride_cs, stride_ch)
        alibi = 0.0  # no bias: attend_tile ignores it
        if HAS_ALIBI:
            alibi = alibi_tile(slope, n, pos)
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tok_off, nmask, nmask[None, :], d, dmask,
            k_scale, v_scale, scale_log2, softcap, FP8_KV, PRECISION, HAS_SOFTCAP,
            alibi, HAS_ALIBI,
        )

    if ONE_SPLIT:
        # context_len 0 (a padded batch slot) yields zeros rather than NaN
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        # partials: m, l [B, HQ, NUM_SPLITS]; acc [B, HQ, NUM_SPLITS, D], contiguous
        row = (seq * HQ + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(m_ptr + row, m_i, mask=gmask)
        tl.store(l_ptr + row, l_i, mask=gmask)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    HQ, D, NUM_SPLITS, stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    dmask = d < D
    rows = (seq * HQ + head) * NUM_SPLITS + s
    m = tl.load(m_ptr + rows, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    denom = tl.sum(w * l, 0)
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def plan_splits(batch: int, num_kv_heads: int, max_tokens: int, block_n: int, sm_count: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_len) for contexts of at most ``max_tokens``.

    Enough (sequence, kv head, split) programs to give every SM about four,
    each split at least MIN_TILES_PER_SPLIT tiles and a whole number of
    BLOCK_N tiles. An explicit ``num_splits`` is honoured up to one tile per
    split.
    """
    tiles = max(1, triton.cdiv(max_tokens, block_n))
    if num_splits is None:
        want = max(1, 4 * sm_count // max(1, batch * num_kv_heads))
        num_splits = min(want, triton.cdiv(tiles, MIN_TILES_PER_SPLIT))
    tiles_per_split = triton.cdiv(tiles, max(1, min(num_splits, tiles)))
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split * block_n


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [NB, BS, Hk, D]
    v_cache: torch.Tensor,  # [NB, BS, Hk, D]
    block_tables: torch.Tensor,  # [B, M] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int = 0,
    softcap: float = 0.0,
    *,
    num_splits: int | None = None,
    sinks: torch.Tensor | None = None,  # [Hq] float
    alibi_slopes: torch.Tensor | None = None,  # [Hq] float32
) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.reference.paged_decode_attention``.

    ``num_splits`` overrides the planned KV split count (benchmarks, tests).
    A sequence with context_len 0 gets a zero output.
    """
    op = "paged_decode_attention"
    check_paged_attention_args(op, q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale)
    check_alibi_slopes(op, q, alibi_slopes)
    b, hq, d = q.shape
    if block_tables.shape[0] != b:
        raise ValueError(f"{op}: q has {b} sequences but block_tables has {block_tables.shape[0]} rows")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    sinks_arg, has_sinks = sink_args(op, sinks, q)
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    _, bs, hk, _ = k_cache.shape
    g = hq // hk
    block_d = max(16, next_pow2(d))
    gh = heads_per_program(g, block_d)
    hb = triton.cdiv(g, gh)
    block_n = CPU_BLOCK_N if q.device.type != "cuda" else (
        GPU_BLOCK_N if block_d <= 256 else WIDE_GPU_BLOCK_N)
    splits, split_len = plan_splits(b, hk, block_tables.shape[1] * bs, block_n, num_sms(q.device),
                                    num_splits)
    kc, vc = as_kernel_cache(k_cache), as_kernel_cache(v_cache)
    if splits > 1:
        m = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    else:
        m = l = acc = out  # unused by the single-split kernel
    _decode_split_kernel[(b, hk * hb, splits)](
        q, kc, vc, block_tables, context_lens,
        out, m, l, acc,
        score_scale(scale, softcap), float(k_scale), float(v_scale), int(sliding_window),
        float(softcap), sinks_arg, hq, g, gh, hb, d, bs, splits, split_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        out if alibi_slopes is None else alibi_slopes,  # without ALiBi: never read
        FP8_KV=is_fp8(k_cache), DOT_F32=dot_in_fp32(q), PRECISION=dot_precision(q),
        ONE_SPLIT=splits == 1, HAS_WINDOW=sliding_window > 0, HAS_SOFTCAP=softcap > 0,
        BLOCK_G=max(16, next_pow2(gh)), BLOCK_N=block_n, BLOCK_D=block_d, HAS_SINKS=has_sinks,
        HAS_ALIBI=alibi_slopes is not None,
        num_warps=4 if block_d <= 256 else 8,
    )
    if splits > 1:
        _decode_reduce_kernel[(b, hq)](
            m, l, acc, out, hq, d, splits, out.stride(0), out.stride(1),
            BLOCK_S=next_pow2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
