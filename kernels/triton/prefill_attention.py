"""Variable-length causal attention over a paged KV cache (prefill and
chunked prefill; a sequence's earlier tokens may already be cached).

Each program owns one tile of BLOCK_Q query tokens of one sequence times the
G query heads sharing one kv head (at most 16 of them for heads wider than
256: ``heads_per_program``), packed as BLOCK_M = BLOCK_Q * G rows (padded
to a power of two), and runs flash-attention's online softmax over
KV tiles read through the block table, up to its last query's position.

The grid is sized from shapes alone, ``T // BLOCK_Q + B`` tiles per kv head
(an upper bound on the tiles all sequences need); a program finds its
sequence by binary search over cu_query_lens and exits if its tile is past
the sequence's end. No host sync, so the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.triton._common import (
    INDEX_DTYPES,
    as_kernel_cache,
    check_alibi_slopes,
    check_device,
    check_dtype,
    check_ndim,
    check_paged_attention_args,
    dot_in_fp32,
    heads_per_program,
    dot_precision,
    is_fp8,
    next_pow2,
)
from splitserve.kernels.triton.paged_tile import (
    alibi_tile,
    attend_tile,
    paged_token_offsets,
    score_scale,
    sink_args,
    sink_init,
)


@triton.jit
def _find_sequence(cu_query_lens_ptr, B, tile_id, BLOCK_Q: tl.constexpr):
    # Sequence b owns tiles [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1):
    # the last b whose first tile is <= tile_id.
    lo: tl.int32 = 0
    hi = B
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_query_lens_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_query_lens_ptr, context_lens_ptr, out_ptr,
    scale_log2, k_scale, v_scale, window, softcap, sinks_ptr,
    B, G, GH, HB, D, BS,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt, alibi_ptr,
    FP8_KV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1) // HB  # HB programs per kv head, GH of its G query heads each
    hb = tl.program_id(1) % HB
    seq = _find_sequence(cu_query_lens_ptr, B, tile_id, BLOCK_Q)
    q_start = tl.load(cu_query_lens_ptr + seq)
    q_len = tl.load(cu_query_lens_ptr + seq + 1) - q_start
    tile = tile_id - (q_start // BLOCK_Q + seq)
    if tile * BLOCK_Q >= q_len:
        return  # spare tile of the upper-bound grid
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # cached tokens before this chunk

    r = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + r // GH  # [BLOCK_M] query index within the sequence
    head_in_group = hb * GH + r % GH
    heads = kv_head * G + head_in_group
    rmask = (r < BLOCK_Q * GH) & (tok < q_len) & (head_in_group < G)
    pos = prefix + tok  # each row's position; it sees keys <= pos
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    row_off = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row_off[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:  # each row's head's ALiBi slope
        slope = tl.load(alibi_ptr + heads, mask=rmask, other=0.0)

    if HAS_SINKS:  # each row's head's sink logit joins the denominator
        m_i, l_i = sink_init(sinks_ptr, heads, rmask, True, BLOCK_M)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(ctx, prefix + tl.minimum((tile + 1) * BLOCK_Q, q_len))  # last row's pos + 1
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_start = 0
    if HAS_WINDOW:  # the tile's first row sees nothing before its own pos - window + 1
        kv_start = tl.maximum(0, prefix + tile * BLOCK_Q - window + 1)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        tok_off = paged_token_offsets(bt_row, n, nmask, kv_head, BS, stride_cb, stride_cs, stride_ch)
        visible = nmask[None, :] & (n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (n[None, :] > pos[:, None] - window)
        alibi = 0.0  # no bias: attend_tile ignores it
        if HAS_ALIBI:
            alibi = alibi_tile(slope, n, pos)
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, tok_off, nmask, visible, d, dmask,
            k_scale, v_scale, scale_log2, softcap, FP8_KV, PRECISION, HAS_SOFTCAP,
            alibi, HAS_ALIBI,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row_off[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _tile_shape(g: int, d: int, on_gpu: bool, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N, num_warps) for ``g`` query heads per
    program (``heads_per_program``)."""
    if not on_gpu:  # interpreter: small tiles keep numpy work per step small
        block_m, block_n = 16, 16
    elif d <= 128 and not fp32:
        block_m, block_n = 128, 64
    elif next_pow2(d) <= 256:  # fp32 operands or wide heads: halve the tiles to stay within shared memory
        block_m, block_n = 64, 32
    else:  # 512 and 1024 wide (Gemma 4, MLA's latent): 16 rows, and 8 warps share the accumulator
        return max(16, next_pow2(g)), max(16, next_pow2(g)) // g, 32, 8
    block_m = max(block_m, next_pow2(g))
    return block_m, block_m // g, block_n, 8 if block_m >= 128 else 4


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [NB, BS, Hk, D]
    v_cache: torch.Tensor,  # [NB, BS, Hk, D]
    block_tables: torch.Tensor,  # [B, M] int
    cu_query_lens: torch.Tensor,  # [B+1] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,  # [Hq] float
    alibi_slopes: torch.Tensor | None = None,  # [Hq] float32
) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.reference.paged_attention``.

    A query row that can see no key (context_len < q_len, invalid input)
    gets zeros.
    """
    op = "paged_attention"
    check_paged_attention_args(op, q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale)
    check_alibi_slopes(op, q, alibi_slopes)
    b = context_lens.shape[0]
    check_ndim(op, "cu_query_lens", cu_query_lens, 1, "[num_seqs + 1]")
    check_dtype(op, "cu_query_lens", cu_query_lens, INDEX_DTYPES)
    check_device(op, q, cu_query_lens=cu_query_lens)
    if cu_query_lens.shape[0] != b + 1:
        raise ValueError(
            f"{op}: cu_query_lens has {cu_query_lens.shape[0]} entries; expected num_seqs + 1 = {b + 1}"
        )
    sinks_arg, has_sinks = sink_args(op, sinks, q)
    t, hq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0 or b == 0:
        return out
    _, bs, hk, _ = k_cache.shape
    g = hq // hk
    gh = heads_per_program(g, max(16, next_pow2(d)))
    hb = triton.cdiv(g, gh)
    block_m, block_q, block_n, num_warps = _tile_shape(gh, d, q.device.type == "cuda", dot_in_fp32(q))
    kc, vc = as_kernel_cache(k_cache), as_kernel_cache(v_cache)
    _paged_prefill_kernel[(t // block_q + b, hk * hb)](
        q, kc, vc, block_tables, cu_query_lens, context_lens, out,
        score_scale(scale, softcap), float(k_scale), float(v_scale), int(sliding_window),
        float(softcap), sinks_arg, b, g, gh, hb, d, bs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        out if alibi_slopes is None else alibi_slopes,  # without ALiBi: never read
        FP8_KV=is_fp8(k_cache), DOT_F32=dot_in_fp32(q), PRECISION=dot_precision(q),
        HAS_WINDOW=sliding_window > 0, HAS_SOFTCAP=softcap > 0, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
        HAS_SINKS=has_sinks, HAS_ALIBI=alibi_slopes is not None,
        num_warps=num_warps,
    )
    return out
