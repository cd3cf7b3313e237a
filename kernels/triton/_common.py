"""Launcher-side helpers shared by the Triton kernel families: argument
checks with actionable messages, power-of-two sizing and per-device facts.

Torch-only on purpose: the kernels import this, never the other way round.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from splitserve.kernels.reference import FP8_DTYPES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


WIDE_HEADS_PER_PROGRAM = 16  # query heads per program over heads wider than 256


def heads_per_program(g: int, block_d: int) -> int:
    """How many of a kv head's ``g`` query heads one attention program takes:
    all of them, except over tiles wider than 256 (``block_d``), where a
    [heads, block_d] query tile and accumulator for up to 128 heads (MLA)
    would overflow shared memory and registers: 16 then."""
    return g if block_d <= 256 else min(g, WIDE_HEADS_PER_PROGRAM)


def check_device(op: str, ref: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the other tensors are on {ref.device}; "
                "move every argument to one device"
            )


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: {names}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    # Kernels vectorise along the last dim; other dims may have any stride.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name} must have a unit stride in its last dim (got strides {t.stride()}); "
            "pass .contiguous()"
        )


def check_cache_pair(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache, v_cache: [NB, BS, Hk, D], same shape, dtype and strides."""
    check_ndim(op, "k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"{op}: v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}"
        )
    if v_cache.stride() != k_cache.stride():
        raise ValueError(
            f"{op}: k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} "
            "differ; both must be views of one cache layout"
        )
    check_dtype(op, "k_cache", k_cache, FLOAT_DTYPES + FP8_DTYPES)
    check_last_dim_contiguous(op, "k_cache", k_cache)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def as_kernel_cache(cache: torch.Tensor) -> torch.Tensor:
    """FP8 caches travel to kernels as their raw bytes: the kernels decode and
    encode e4m3 themselves, so one code path runs compiled and interpreted."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache


def dot_in_fp32(t: torch.Tensor) -> bool:
    """Whether attention dots run in float32 for query tensor ``t``.

    True for float32 queries and for CPU tensors: Triton's interpreter
    multiplies bfloat16 operands as their raw 16-bit patterns, so on CPU every
    dot is widened to float32 first.
    """
    return t.dtype == torch.float32 or t.device.type != "cuda"


def dot_precision(t: torch.Tensor) -> str:
    # "ieee" keeps float32 dots exact (no TF32); "tf32" is Triton's default
    # and a no-op for 16-bit operands.
    return "ieee" if dot_in_fp32(t) else "tf32"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small fixed count on CPU
    keeps interpreted grids tiny."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check_paged_attention_args(
    op: str,
    q: torch.Tensor,  # [T or B, Hq, D]
    k_cache: torch.Tensor,  # [NB, BS, Hk, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    k_scale: float,
    v_scale: float,
) -> None:
    check_ndim(op, "q", q, 3, "[tokens, num_heads, head_dim]")
    check_cache_pair(op, k_cache, v_cache)
    check_dtype(op, "q", q, FLOAT_DTYPES)
    check_last_dim_contiguous(op, "q", q)
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"{op}: q head_dim {d} differs from the cache's head_dim {k_cache.shape[3]}")
    if hk == 0 or hq % hk:
        raise ValueError(f"{op}: num query heads {hq} must be a multiple of num kv heads {hk}")
    check_ndim(op, "block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check_ndim(op, "context_lens", context_lens, 1, "[num_seqs]")
    check_dtype(op, "block_tables", block_tables, INDEX_DTYPES)
    check_dtype(op, "context_lens", context_lens, INDEX_DTYPES)
    check_last_dim_contiguous(op, "block_tables", block_tables)
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"{op}: block_tables has {block_tables.shape[0]} rows but context_lens has "
            f"{context_lens.shape[0]} sequences"
        )
    check_device(op, q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                 context_lens=context_lens)
    if is_fp8(k_cache) and (k_scale <= 0 or v_scale <= 0):
        raise ValueError(f"{op}: fp8 scales must be positive, got k_scale={k_scale}, v_scale={v_scale}")


def check_alibi_slopes(op: str, q: torch.Tensor, alibi_slopes: torch.Tensor | None) -> None:
    """``alibi_slopes``: None, or one float32 slope per query head on q's device."""
    if alibi_slopes is None:
        return
    if alibi_slopes.shape != (q.shape[1],) or alibi_slopes.dtype != torch.float32:
        raise ValueError(f"{op}: alibi_slopes must be float32 [{q.shape[1]}] (one per query head), "
                         f"got {alibi_slopes.dtype} {list(alibi_slopes.shape)}")
    check_device(op, q, alibi_slopes=alibi_slopes)
    if not alibi_slopes.is_contiguous():
        raise ValueError(f"{op}: alibi_slopes must be contiguous")
