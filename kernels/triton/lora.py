"""Batched LoRA (shrink and expand) for a batch that mixes adapters.

The contract is ``splitserve.kernels.lora`` (the torch reference): tokens
carry a slot index (-1: no adapter) and ``LoraMeta`` groups them by slot.
Both kernels run one program per (slot, block of that slot's tokens,
output tile); a program gathers its BLOCK_M token rows through
``sorted_tokens`` and multiplies them by its slot's matrix with ``tl.dot``,
so a prefill chunk of one adapter is a small GEMM and a decode batch of
many adapters a gathered one (Punica's SGMV). Programs past their slot's
segment exit at once; the grid is sized from shapes alone (slots x token
blocks x tiles), so the launch never syncs with the host and a decode
step can be captured in a CUDA graph.

1. ``_lora_shrink_kernel``: h[t, :] = x[t] @ A[slot]^T in float32 ([T, N]).
2. ``_lora_expand_kernel``: for each slice i (one per fused part: q/k/v,
   gate/up), y[t, o_i + n] += h[t, iR:(i+1)R] @ B[slot, o_i + n, :]^T, the
   sum in float32 with y's value and stored in y's dtype. Each output
   element belongs to exactly one program (a token has one slot), so the
   in-place add needs no atomics.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from splitserve.kernels.lora import LoraMeta
from splitserve.kernels.triton._common import (
    FLOAT_DTYPES,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_ndim,
    dot_in_fp32,
    dot_precision,
    next_pow2,
)

MAX_SLICES = 3  # q/k/v


@triton.jit
def _segment_rows(sorted_ptr, seg_start_ptr, seg_len_ptr, slot, m_block, BLOCK_M: tl.constexpr):
    """This program's token rows of ``slot`` (int64) and their mask; the
    mask is empty past the slot's segment."""
    seg_len = tl.load(seg_len_ptr + slot)
    start = tl.load(seg_start_ptr + slot)
    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < seg_len
    rows = tl.load(sorted_ptr + start + m, mask=mmask, other=0).to(tl.int64)
    return rows, mmask


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, sorted_ptr, seg_start_ptr, seg_len_ptr,
    N, K,
    stride_xt, stride_as, stride_an, stride_ht,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: [T, K]; a: [S, N, K]; h: [T, N] float32
    slot = tl.program_id(0)
    m_block = tl.program_id(1)
    if m_block * BLOCK_M >= tl.load(seg_len_ptr + slot):
        return  # past this slot's tokens
    rows, mmask = _segment_rows(sorted_ptr, seg_start_ptr, seg_len_ptr, slot, m_block, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    a_base = a_ptr + slot.to(tl.int64) * stride_as + n[None, :] * stride_an
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :],
                     mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_base + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)  # [BK, BN]
        if DOT_F32:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    tl.store(h_ptr + rows[:, None] * stride_ht + n[None, :], acc,
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, y_ptr, sorted_ptr, seg_start_ptr, seg_len_ptr,
    off0, off1, off2, off3, R, n_blocks,
    stride_ht, stride_bs, stride_bm, stride_yt,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # h: [T, n_slices * R] float32; b: [S, M, R]; y: [T, M] updated in place
    # slice i: output columns [off_i, off_(i+1)), rank columns [i R, (i+1) R)
    slot = tl.program_id(0)
    m_block = tl.program_id(1)
    if m_block * BLOCK_M >= tl.load(seg_len_ptr + slot):
        return
    rows, mmask = _segment_rows(sorted_ptr, seg_start_ptr, seg_len_ptr, slot, m_block, BLOCK_M)
    piece = tl.program_id(2)
    part = piece // n_blocks
    lo = tl.where(part == 0, off0, tl.where(part == 1, off1, off2))
    hi = tl.where(part == 0, off1, tl.where(part == 1, off2, off3))
    cols = lo + (piece % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < hi
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + cols[None, :] * stride_bm
    h_base = h_ptr + rows[:, None] * stride_ht + part * R
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < R
        bt = tl.load(b_base + r[:, None], mask=rmask[:, None] & cmask[None, :], other=0.0)  # [BR, BN]
        # h rounded to B's dtype, where a LoRA layer in that dtype rounds its A output
        ht = tl.load(h_base + r[None, :], mask=mmask[:, None] & rmask[None, :],
                     other=0.0).to(b_ptr.dtype.element_ty)  # [BM, BR]
        if DOT_F32:
            ht = ht.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(ht, bt, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_yt + cols[None, :]
    ymask = mmask[:, None] & cmask[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def _tiles(on_gpu: bool, width: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): 16-row token blocks (decode batches are
    small and a slot's segment rarely fills more); small tiles under the
    interpreter, where numpy work per step is what costs."""
    if not on_gpu:
        return 16, min(32, max(16, next_pow2(width))), 32
    return 16, min(128, max(16, next_pow2(width))), 64


def _check_meta(op: str, ref: torch.Tensor, meta: LoraMeta, num_tokens: int, num_slots: int) -> None:
    if meta.sorted_tokens.shape[0] != num_tokens or meta.token_slots.shape[0] != num_tokens:
        raise ValueError(f"{op}: the batch has {num_tokens} tokens but its LoraMeta describes "
                         f"{meta.sorted_tokens.shape[0]}")
    if meta.seg_start.shape[0] != num_slots or meta.seg_len.shape[0] != num_slots:
        raise ValueError(f"{op}: the weights have {num_slots} slots but the LoraMeta has "
                         f"{meta.seg_len.shape[0]} segments")
    for name, t in zip(LoraMeta._fields, meta):
        check_dtype(op, name, t, (torch.int32,))
    check_device(op, ref, **dict(zip(LoraMeta._fields, meta)))


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """See ``splitserve.kernels.lora.lora_shrink``."""
    op = "lora_shrink"
    check_ndim(op, "x", x, 2, "[tokens, in_features]")
    check_ndim(op, "lora_a", lora_a, 3, "[slots, slices * rank, in_features]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_dtype(op, "lora_a", lora_a, (x.dtype,))
    check_last_dim_contiguous(op, "x", x)
    check_last_dim_contiguous(op, "lora_a", lora_a)
    t, k = x.shape
    s, n, ka = lora_a.shape
    if ka != k:
        raise ValueError(f"{op}: lora_a {tuple(lora_a.shape)} does not fit x {tuple(x.shape)}")
    _check_meta(op, x, meta, t, s)
    check_device(op, x, lora_a=lora_a)
    h = torch.empty(t, n, dtype=torch.float32, device=x.device)
    if t == 0 or s == 0:
        return h
    block_m, block_n, block_k = _tiles(x.device.type == "cuda", n)
    grid = (s, triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    _lora_shrink_kernel[grid](
        x, lora_a, h, meta.sorted_tokens, meta.seg_start, meta.seg_len,
        n, k, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
        DOT_F32=dot_in_fp32(x), PRECISION=dot_precision(x),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta,
                slice_offsets: Sequence[int]) -> torch.Tensor:
    """See ``splitserve.kernels.lora.lora_expand``."""
    op = "lora_expand"
    check_ndim(op, "y", y, 2, "[tokens, out_features]")
    check_ndim(op, "h", h, 2, "[tokens, slices * rank]")
    check_ndim(op, "lora_b", lora_b, 3, "[slots, out_features, rank]")
    check_dtype(op, "y", y, FLOAT_DTYPES)
    check_dtype(op, "h", h, (torch.float32,))
    check_dtype(op, "lora_b", lora_b, FLOAT_DTYPES)
    for name, t in (("y", y), ("h", h), ("lora_b", lora_b)):
        check_last_dim_contiguous(op, name, t)
    t, m = y.shape
    s, mb, r = lora_b.shape
    offsets = [int(o) for o in slice_offsets]
    parts = len(offsets) - 1
    if not 1 <= parts <= MAX_SLICES or offsets[0] != 0 or offsets[-1] != m or mb != m:
        raise ValueError(f"{op}: slice_offsets {offsets} must run from 0 to out_features ({m}) "
                         f"in 1..{MAX_SLICES} slices, and lora_b {tuple(lora_b.shape)} must have "
                         f"{m} rows")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{op}: slice_offsets {offsets} must not decrease")
    if h.shape[0] != t or h.shape[1] != parts * r:
        raise ValueError(f"{op}: h {tuple(h.shape)} does not fit {t} tokens of {parts} slices "
                         f"of rank {r}")
    _check_meta(op, y, meta, t, s)
    check_device(op, y, h=h, lora_b=lora_b)
    if t == 0 or s == 0:
        return y
    offsets += [m] * (MAX_SLICES + 1 - len(offsets))
    widest = max(b - a for a, b in zip(offsets, offsets[1:]))
    block_m, block_n, _ = _tiles(y.device.type == "cuda", widest)
    block_r = min(64, max(16, next_pow2(r)))
    n_blocks = triton.cdiv(max(widest, 1), block_n)
    grid = (s, triton.cdiv(t, block_m), parts * n_blocks)
    _lora_expand_kernel[grid](
        h, lora_b, y, meta.sorted_tokens, meta.seg_start, meta.seg_len,
        *offsets, r, n_blocks, h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        DOT_F32=dot_in_fp32(lora_b), PRECISION=dot_precision(lora_b),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return y
