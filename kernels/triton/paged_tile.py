"""Jitted building blocks shared by the paged attention kernels: locating a
tile of cached tokens through a block table, and one online-softmax step
over such a tile (flash-attention style, log2 domain, fp32 statistics).
"""

import math

import triton
import triton.language as tl

from splitserve.kernels.triton.fp8_codec import decode_e4m3


@triton.jit
def paged_token_offsets(block_table_row, n, nmask, kv_head, BS, stride_cb, stride_cs, stride_ch):
    """n: [BLOCK_N] token positions of one sequence -> element offsets of
    their (block, slot, kv_head) rows in a [NB, BS, Hk, D] cache."""
    blk = tl.load(block_table_row + n // BS, mask=nmask, other=0).to(tl.int64)
    return blk * stride_cb + (n % BS).to(tl.int64) * stride_cs + kv_head * stride_ch


def score_scale(scale: float, softcap: float) -> float:
    """What ``attend_tile`` multiplies q.k by: the softmax scale in log2 units,
    or, with a soft cap (applied in natural units), the plain scale."""
    return float(scale) if softcap > 0 else float(scale) * math.log2(math.e)


def sink_args(op: str, sinks, q) -> tuple[object, bool]:
    """(the sinks pointer a kernel takes, whether there are sinks) for an
    op's optional ``sinks`` ([Hq] float, one logit per query head); q stands
    in as the pointer when there are none."""
    if sinks is None:
        return q, False
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[1] or not sinks.is_floating_point():
        raise ValueError(f"{op}: sinks must be a float tensor of [num_heads={q.shape[1]}], "
                         f"got {sinks.dtype} {list(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"{op}: sinks are on {sinks.device} but q is on {q.device}")
    return sinks.contiguous(), True


@triton.jit
def sink_init(sinks_ptr, heads, hmask, first, BLOCK: tl.constexpr):
    """Online-softmax state (m, l) [BLOCK] of rows of query heads ``heads``
    before their first tile: the sink logit (log2 units) as the running max
    and exp2(0) = 1 in the denominator, a virtual key with no value. Only
    where ``first`` (one split of a split-K pass carries the sink); else the
    empty state (-inf, 0)."""
    sink = tl.load(sinks_ptr + heads, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
    m = tl.where(first, sink, float("-inf"))
    l = tl.where(first, tl.full([BLOCK], 1.0, tl.float32), tl.zeros([BLOCK], tl.float32))
    return m, l


@triton.jit
def alibi_tile(slope, n, pos):
    """ALiBi's bias of a tile: slope [M] (each row's head's slope), n [N]
    key positions, pos [M] (each row's query position) -> ``slope * (n -
    pos)``, [M, N] float32 in natural units."""
    return slope[:, None] * (n[None, :] - pos[:, None]).to(tl.float32)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives 1, underflowing to 0
    # gives -1, so large scores saturate without NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attend_tile(
    q, m_i, l_i, acc,
    k_cache_ptr, v_cache_ptr, tok_off, nmask, visible, d, dmask,
    k_scale, v_scale, scale_log2, softcap,
    FP8_KV: tl.constexpr, PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    alibi, HAS_ALIBI: tl.constexpr,
):
    """One KV tile of online softmax for a block of query rows.

    With HAS_SOFTCAP, ``scale_log2`` is the plain softmax scale (natural
    units) and each score is capped to ``softcap * tanh(score / softcap)``
    before it moves to the log2 domain (Gemma 2). With HAS_ALIBI, ``alibi``
    ([M, N] float32, natural units: ``alibi_tile``) is added to the scores
    after the cap.

    q: [M, BD] (in the dot dtype); m_i, l_i: [M] running max (log2 units)
    and denominator; acc: [M, BD] fp32 unnormalised output; tok_off,
    nmask: [N]; visible: [M, N] which scores count. Returns (m_i, l_i, acc).
    Rows that see nothing keep m = -inf, l = 0 and acc = 0 (no NaN).
    """
    k_t = tl.load(k_cache_ptr + tok_off[None, :] + d[:, None], mask=nmask[None, :] & dmask[:, None], other=0)
    if FP8_KV:
        k_t = decode_e4m3(k_t, k_scale)
    s = tl.dot(q, k_t.to(q.dtype), input_precision=PRECISION) * scale_log2  # [M, N]
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap) * 1.4426950408889634  # capped, then to log2 units
    if HAS_ALIBI:
        s = s + alibi * 1.4426950408889634
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + tok_off[:, None] + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0)
    if FP8_KV:
        v = decode_e4m3(v, v_scale)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc
