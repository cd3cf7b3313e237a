"""Attention metadata for one forward step, and the paged attention layer op.

The runner builds one ``AttentionMetadata`` per step for the flat batch of
scheduled tokens; every layer reads it. Sequences appear in the same order
as their tokens in the flat batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels import ops


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token (-1: skip)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_query_lens: torch.Tensor  # [B+1] int32 offsets of each sequence's tokens
    context_lens: torch.Tensor  # [B] int32 tokens in cache after this step
    decode_only: bool  # every sequence has exactly one new token
    k_scale: float = 1.0  # fp8 KV scales (1.0 for bf16/fp16/fp32 caches)
    v_scale: float = 1.0
    # hybrid models (splitserve.engine.state_cache): [B] int64 each sequence's
    # recurrent-state slot, and each sequence's new tokens on the host; None otherwise
    state_slots: torch.Tensor | None = None
    query_lens: tuple[int, ...] | None = None
    # ... and whether each sequence's chunk is a verify chunk whose per-token states are
    # kept for the rollback of rejected drafts (RecurrentState.keep)
    keep_states: tuple[bool, ...] | None = None


def paged_attention_layer(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D], or [1, ...]: keys that are the values
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,  # [Hq] float32
) -> torch.Tensor:
    """Store this step's K/V into the cache, then attend over the cache
    (over its latest ``sliding_window`` tokens when > 0; scores soft-capped
    at ``softcap`` when > 0, as Gemma 2 does; ``sinks`` [Hq] float32: each
    head's sink logit joining its softmax's denominator, as gpt-oss does;
    with ``alibi_slopes``, head h's scores biased by ``slope_h * (key
    position - query position)``, as Bloom, MPT and Falcon's ALiBi do).

    A one-plane ``layer_cache`` (multi-head latent attention) is both the
    key and the value cache, ``k`` and ``v`` the same tensor.

    Returns [T, Hq, D]."""
    k_cache, v_cache = layer_cache[0], layer_cache[-1]
    ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, meta.k_scale, meta.v_scale)
    if meta.decode_only:
        return ops.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
            meta.k_scale, meta.v_scale, sliding_window, softcap, sinks=sinks,
            alibi_slopes=alibi_slopes,
        )
    return ops.paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.cu_query_lens, meta.context_lens,
        scale, meta.k_scale, meta.v_scale, sliding_window, softcap, sinks=sinks,
        alibi_slopes=alibi_slopes,
    )
