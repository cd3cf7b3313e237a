"""Fused mixture-of-experts MLP: a grouped GEMM over the tokens routed to each expert.

Each token picks K experts, so a batch of T tokens makes P = T * K
token-expert pairs. ``group_by_expert`` sorts the pairs by expert and pads
each expert's run to a multiple of BLOCK_M, so every block of BLOCK_M
sorted rows belongs to one expert (spare rows hold the id P, masked off).
Two kernels then run one program per (row block, output tile):

1. ``_moe_gate_up_kernel``: gathers the block's token rows of x, multiplies
   them by the expert's gate and up weights (two accumulators over H) and
   writes silu(gate) * up for each pair: [P, I].
2. ``_moe_down_kernel``: multiplies those rows by the expert's down weights
   (over I), scales each pair by its routing weight and writes [P, H] in
   float32; the K pairs of a token are summed afterwards (a [T, K, H] sum,
   deterministic, unlike atomic adds).

FP8 experts (``fp8_fused_moe``, weight-only) run the same kernels with
``W_FP8``: weight tiles are decoded from e4m3 bytes to the activations'
dtype and scaled as ``splitserve.kernels.triton.fp8_gemm`` scales a linear
weight (once at the end, or per K tile for block scales).

An expert no token chose gets no block. The grid is sized from shapes alone
(``P // BLOCK_M + min(E, P)`` blocks bound what any routing needs); spare
blocks exit at once, so nothing syncs with the host and the launch is
CUDA-graph capturable. Rounding follows ``splitserve.kernels.reference.
fused_moe``: projections rounded to x.dtype, the weighted sum in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.fp8_gemm import FP8_WEIGHT_DTYPE, scale_shape
from splitserve.kernels.triton._common import (FLOAT_DTYPES, INDEX_DTYPES, check_device, check_dtype,
                                               check_last_dim_contiguous, check_ndim, dot_in_fp32,
                                               dot_precision, next_pow2)
from splitserve.kernels.triton.fp8_codec import decode_e4m3
from splitserve.kernels.triton.fp8_gemm import block_k_for


@triton.jit
def _tile(block_expert_ptr, pair_ids_ptr, num_pairs, N, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """This program's tile: its block's expert (-1: a spare block of the
    upper-bound grid), the block's pair ids (spare rows hold num_pairs) and
    their mask, the output columns and their mask."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pairs, pairs < num_pairs, n, n < N


@triton.jit
def _load_weight_tile(ptrs, mask, a, W_FP8: tl.constexpr, DOT_F32: tl.constexpr):
    """A [BK, BN] weight tile ready to multiply ``a``: fp8 bytes decoded
    (exactly) to a's dtype, float32 for float32 dots."""
    if W_FP8:
        w = decode_e4m3(tl.load(ptrs, mask=mask, other=0), 1.0)
        if not DOT_F32:
            w = w.to(a.dtype)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0)
        if DOT_F32:
            w = w.to(tl.float32)
    return w


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, w_scale_ptr, out_ptr, pair_ids_ptr, block_expert_ptr,
    num_pairs, N, K,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
    TOP_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    W_FP8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    SCALE_EACH_K_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: [T, K=H]; w: [E, 2N, K] rows [gate | up]; out: [P, N]
    # W_FP8: w holds e4m3 bytes, w_scale [E, ceil(2N/GROUP_N), ceil(K/GROUP_K)] float32
    expert, pairs, rmask, n, nmask = _tile(block_expert_ptr, pair_ids_ptr, num_pairs, N,
                                           BLOCK_M, BLOCK_N)
    if expert < 0:
        return  # spare block of the upper-bound grid
    tokens = (pairs // TOP_K).to(tl.int64)
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + n[None, :] * stride_wn
    w_up = w_gate + N * stride_wn
    s_gate = w_scale_ptr + expert.to(tl.int64) * stride_se + (n // GROUP_N) * stride_sn  # [BN]
    s_up = w_scale_ptr + expert.to(tl.int64) * stride_se + ((N + n) // GROUP_N) * stride_sn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            a = a.to(tl.float32)
        wmask = kmask[:, None] & nmask[None, :]
        g = _load_weight_tile(w_gate + k[:, None], wmask, a, W_FP8, DOT_F32)  # [BK, BN]
        u = _load_weight_tile(w_up + k[:, None], wmask, a, W_FP8, DOT_F32)
        if SCALE_EACH_K_TILE:
            sg = tl.load(s_gate + k0 // GROUP_K, mask=nmask, other=0.0)
            su = tl.load(s_up + k0 // GROUP_K, mask=nmask, other=0.0)
            acc_gate += tl.dot(a, g, input_precision=PRECISION) * sg[None, :]
            acc_up += tl.dot(a, u, input_precision=PRECISION) * su[None, :]
        else:
            acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
    if W_FP8 and not SCALE_EACH_K_TILE:
        acc_gate = acc_gate * tl.load(s_gate, mask=nmask, other=0.0)[None, :]
        acc_up = acc_up * tl.load(s_up, mask=nmask, other=0.0)[None, :]
    dtype = out_ptr.dtype.element_ty
    # rounded where silu_and_mul(linear(x, w)) rounds: the projection, silu, the product
    gate = acc_gate.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    y = act * acc_up.to(dtype).to(tl.float32)
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + n[None, :], y.to(dtype),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, w_scale_ptr, topk_weights_ptr, out_ptr, pair_ids_ptr, block_expert_ptr,
    num_pairs, N, K,
    stride_ht, stride_we, stride_wn, stride_se, stride_sn, stride_ot,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    W_FP8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    SCALE_EACH_K_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # h: [P, K=I]; w: [E, N=H, K]; topk_weights: [P] float32; out: [P, N] float32
    expert, pairs, rmask, n, nmask = _tile(block_expert_ptr, pair_ids_ptr, num_pairs, N,
                                           BLOCK_M, BLOCK_N)
    if expert < 0:
        return
    rows = pairs.to(tl.int64)
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + n[None, :] * stride_wn
    s_rows = w_scale_ptr + expert.to(tl.int64) * stride_se + (n // GROUP_N) * stride_sn  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(h_ptr + rows[:, None] * stride_ht + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        if DOT_F32:
            a = a.to(tl.float32)
        w = _load_weight_tile(w_rows + k[:, None], kmask[:, None] & nmask[None, :], a,
                              W_FP8, DOT_F32)  # [BK, BN]
        if SCALE_EACH_K_TILE:
            s = tl.load(s_rows + k0 // GROUP_K, mask=nmask, other=0.0)
            acc += tl.dot(a, w, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if W_FP8 and not SCALE_EACH_K_TILE:
        acc = acc * tl.load(s_rows, mask=nmask, other=0.0)[None, :]
    weight = tl.load(topk_weights_ptr + rows, mask=rmask, other=0.0)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + n[None, :], y, mask=rmask[:, None] & nmask[None, :])


def group_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-expert pairs sorted by expert, each expert's run padded to whole blocks.

    topk_ids: [T, K]; pair p is (token p // K, expert topk_ids.flat[p]).
    Returns (pair_ids [num_blocks * block_m] int32, the pairs in block order,
    P = T * K in spare rows; block_expert [num_blocks] int32, each block's
    expert or -1 for a spare block). ``num_blocks`` depends on shapes only:
    expert e needs ceil(n_e / block_m) <= n_e // block_m + 1 blocks and at
    most min(E, P) experts are chosen. Device ops only, no host sync.
    """
    flat = topk_ids.reshape(-1).long()  # [P]
    p, dev = flat.numel(), flat.device
    num_blocks = p // block_m + min(num_experts, p)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)  # [E] one past each expert's last block
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=dev), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert
    expert = flat[order]
    rank = torch.arange(p, device=dev) - (counts.cumsum(0) - counts)[expert]  # place within its expert
    dest = (block_end - blocks)[expert] * block_m + rank
    pair_ids = torch.full((num_blocks * block_m,), p, dtype=torch.int32, device=dev)
    pair_ids.scatter_(0, dest, order.to(torch.int32))
    return pair_ids, block_expert


def _tile_shape(num_pairs: int, num_experts: int, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if not on_gpu:  # interpreter: small tiles keep numpy work per step small
        return 16, 32, 32, 4, 1
    # rows per expert on average: decode batches leave most of a 64-row block empty
    block_m = min(64, max(16, next_pow2(-(-num_pairs // num_experts))))
    return block_m, 64, 64, 4, 3


def _check_args(op, x, w_gate_up, w_down, topk_weights, topk_ids, fp8: bool = False) -> None:
    check_ndim(op, "x", x, 2, "[num_tokens, hidden]")
    check_ndim(op, "w_gate_up", w_gate_up, 3, "[num_experts, 2 * intermediate, hidden]")
    check_ndim(op, "w_down", w_down, 3, "[num_experts, hidden, intermediate]")
    check_ndim(op, "topk_ids", topk_ids, 2, "[num_tokens, top_k]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    check_dtype(op, "topk_ids", topk_ids, INDEX_DTYPES)
    check_dtype(op, "topk_weights", topk_weights, FLOAT_DTYPES)
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if fp8:
            check_dtype(op, name, w, (FP8_WEIGHT_DTYPE,))
        elif w.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {w.dtype} but x has {x.dtype}; load the "
                             "experts in the activations' dtype")
        check_last_dim_contiguous(op, name, w)
    check_last_dim_contiguous(op, "x", x)
    e, two_i, h = w_gate_up.shape
    if h != x.shape[1] or two_i % 2 or w_down.shape != (e, h, two_i // 2):
        raise ValueError(
            f"{op}: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)} and w_down "
            f"{tuple(w_down.shape)} do not fit [T, H], [E, 2I, H], [E, H, I]")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [{x.shape[0]}, top_k]")
    check_device(op, x, w_gate_up=w_gate_up, w_down=w_down, topk_weights=topk_weights,
                 topk_ids=topk_ids)


def _check_scales(op, w_gate_up, gate_up_scale, gate_up_groups, w_down, down_scale, down_groups) -> None:
    for name, w, sc, (group_n, group_k) in (("gate_up_scale", w_gate_up, gate_up_scale, gate_up_groups),
                                            ("down_scale", w_down, down_scale, down_groups)):
        want = (w.shape[0], *scale_shape(w.shape[1], w.shape[2], group_n, group_k))
        if tuple(sc.shape) != want or sc.dtype != torch.float32:
            raise ValueError(f"{op}: {name} is {tuple(sc.shape)} {sc.dtype}; want {list(want)} "
                             f"float32 for groups of ({group_n}, {group_k})")
        if sc.shape[2] > 1 and sc.stride(2) != 1:
            raise ValueError(f"{op}: {name} must have a unit stride in its last dim")
        check_device(op, w, **{name: sc})


def _run(x, w_gate_up, gu_scale, gu_groups, w_down, d_scale, d_groups, topk_weights, topk_ids,
         fp8: bool) -> torch.Tensor:
    (t, h), (e, two_i, _), top_k = x.shape, w_gate_up.shape, topk_ids.shape[1]
    inter, p = two_i // 2, t * top_k
    if p == 0:
        return torch.zeros_like(x, memory_format=torch.contiguous_format)
    block_m, block_n, block_k, warps, stages = _tile_shape(p, e, x.device.type == "cuda")
    pair_ids, block_expert = group_by_expert(topk_ids, e, block_m)
    num_blocks = block_expert.shape[0]
    dot = dict(DOT_F32=dot_in_fp32(x), PRECISION=dot_precision(x), BLOCK_M=block_m,
               BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    def scales(w, sc, groups):  # (scale tensor, strides, constexprs) for one weight
        if not fp8:
            return w, 0, 0, dict(W_FP8=False, GROUP_N=1, GROUP_K=1, SCALE_EACH_K_TILE=False,
                                 BLOCK_K=block_k)
        group_n, group_k = groups
        per_k_tile = group_k < w.shape[2]
        one_row = sc.shape[1] == 1  # per-tensor: every row reads row 0
        return sc, sc.stride(0), 0 if one_row else sc.stride(1), dict(
            W_FP8=True, GROUP_N=1 if one_row else group_n, GROUP_K=group_k if per_k_tile else 1,
            SCALE_EACH_K_TILE=per_k_tile, BLOCK_K=block_k_for(group_k, w.shape[2], block_k))

    gu_s, gu_se, gu_sn, gu_kw = scales(w_gate_up, gu_scale, gu_groups)
    wb = w_gate_up.view(torch.uint8) if fp8 else w_gate_up
    act = torch.empty((p, inter), dtype=x.dtype, device=x.device)  # [P, I]
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, wb, gu_s, act, pair_ids, block_expert,
        p, inter, h,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), gu_se, gu_sn, act.stride(0),
        TOP_K=top_k, **dot, **gu_kw,
    )
    d_s, d_se, d_sn, d_kw = scales(w_down, d_scale, d_groups)
    wb = w_down.view(torch.uint8) if fp8 else w_down
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [P]
    pair_out = torch.empty((p, h), dtype=torch.float32, device=x.device)  # [P, H]
    _moe_down_kernel[(num_blocks, triton.cdiv(h, block_n))](
        act, wb, d_s, weights, pair_out, pair_ids, block_expert,
        p, h, inter,
        act.stride(0), w_down.stride(0), w_down.stride(1), d_se, d_sn, pair_out.stride(0),
        **dot, **d_kw,
    )
    return pair_out.view(t, top_k, h).sum(dim=1).to(x.dtype)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.reference.fused_moe``."""
    _check_args("fused_moe", x, w_gate_up, w_down, topk_weights, topk_ids)
    return _run(x, w_gate_up, None, None, w_down, None, None, topk_weights, topk_ids, fp8=False)


def fp8_fused_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H] e4m3fn
    gate_up_scale: torch.Tensor,  # [E, ceil(2I/gn), ceil(H/gk)] float32
    gate_up_groups: tuple[int, int],  # (gn, gk)
    w_down: torch.Tensor,  # [E, H, I] e4m3fn
    down_scale: torch.Tensor,  # [E, ceil(H/gn), ceil(I/gk)] float32
    down_groups: tuple[int, int],
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    """Same contract as ``splitserve.kernels.fp8_gemm.fp8_fused_moe``: the
    kernels above with each weight tile decoded from e4m3 bytes in the kernel
    (weight-only fp8) and scaled like ``fp8_gemm`` scales a linear weight."""
    op = "fp8_fused_moe"
    _check_args(op, x, w_gate_up, w_down, topk_weights, topk_ids, fp8=True)
    _check_scales(op, w_gate_up, gate_up_scale, gate_up_groups, w_down, down_scale, down_groups)
    return _run(x, w_gate_up, gate_up_scale, gate_up_groups, w_down, down_scale, down_groups,
                topk_weights, topk_ids, fp8=True)
