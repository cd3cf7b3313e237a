"""Gemma 4's attention (transformers' ``Gemma4TextAttention``) on the engine's paged cache.

Each layer has its own head width and KV heads (``Gemma4Shape``): q_proj, k_proj and,
unless its values are k_proj's output (``attention_k_eq_v`` on the full layers),
v_proj, fused into one matmul. Per head, q and k are RMSNormed (``q_norm`` /
``k_norm``, scaling by their weight) and rotated with the layer type's table; v is
RMSNormed without a weight. Scores are not scaled (scale 1).

The cache has one head count Hk and width D for all layers (the dialect's
``num_key_value_heads`` / ``head_dim``): a layer's keys and values are zero-padded
to D (zero dims add nothing to q . k; the values' give zero output columns, dropped
before o_proj) and each of its KV heads repeated Hk / its own count times, so that
query head h still meets the KV head transformers gives it (h // (Hq / Hk)).

Layers that share an earlier layer's keys and values (``num_kv_shared_layers``)
have no k/v projections: they attend over that layer's cache and write none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import Linear, ShardSlot, linear_slots, model_norm
from splitserve.engine.models.rope import apply_rotary
from splitserve.kernels import ops


def cached_attention(q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     sliding_window: int) -> torch.Tensor:
    """``paged_attention_layer`` without its store: q [T, Hq, D] over the keys and
    values already in ``layer_cache`` (another layer's). Returns [T, Hq, D]."""
    k_cache, v_cache = layer_cache[0], layer_cache[1]
    if meta.decode_only:
        return ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                          meta.k_scale, meta.v_scale, sliding_window)
    return ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_query_lens,
                               meta.context_lens, scale, meta.k_scale, meta.v_scale, sliding_window)


class Gemma4Attention(nn.Module):
    """Layer ``index``'s attention, by its checkpoint names (``self_attn.q_proj``...)."""

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0):
        super().__init__()
        shape = cfg.options.gemma4
        self.num_heads, self.head_dim = cfg.num_heads, shape.head_dims[index]
        self.num_kv_heads = shape.kv_heads[index]
        self.cache_kv_heads, self.cache_dim = cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = sliding_window
        self.shared = shape.shares_kv(index)
        self.k_eq_v = shape.k_eq_v[index]
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        rows = self.q_size
        if not self.shared:
            rows += self.kv_size * (1 if self.k_eq_v else 2)
        self.qkv_proj = Linear(cfg.hidden_size, rows, cfg.attention_bias, dtype, device)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_proj_bias, dtype, device)
        self.q_norm = model_norm(cfg, self.head_dim, dtype, device)
        self.k_norm = None if self.shared else model_norm(cfg, self.head_dim, dtype, device)
        self.eps = cfg.rms_norm_eps
        self.register_buffer("unit_weight", torch.ones(self.head_dim, dtype=dtype, device=device),
                             persistent=False)  # v_norm: an RMSNorm without a weight

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D]: its own, or the layer's it shares
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,  # [max_position, head_dim] float32
    ) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        q = self._normed(qkv[:, :self.q_size], self.q_norm.weight)
        if self.shared:
            # the rotary op turns a (q, k) pair in place: a one-head copy stands in for k
            q, _ = apply_rotary(positions, q, q[:, :1].clone(), cos_sin_cache)
            out = cached_attention(self._padded(q), layer_cache, meta, 1.0, self.sliding_window)
        else:
            k_raw = qkv[:, self.q_size:self.q_size + self.kv_size]
            v_raw = k_raw if self.k_eq_v else qkv[:, self.q_size + self.kv_size:]
            k = self._normed(k_raw, self.k_norm.weight)
            v = self._normed(v_raw, self.unit_weight)
            q, k = apply_rotary(positions, q, k, cos_sin_cache)
            out = paged_attention_layer(self._padded(q), self._kv_heads(k), self._kv_heads(v), layer_cache,
                                        meta, 1.0, self.sliding_window)
        return self.o_proj(out[..., :d].reshape(t, self.q_size))

    def _normed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[T, H * d] rows -> [T, H, d], each head RMSNormed (float32 product)."""
        t = x.shape[0]
        return ops.rms_norm(x.reshape(-1, self.head_dim), weight, self.eps, None, True)[0].view(
            t, -1, self.head_dim)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, d] zero-padded to the cache's width D (contiguous)."""
        return F.pad(x, (0, self.cache_dim - self.head_dim)) if self.head_dim < self.cache_dim \
            else x.contiguous()

    def _kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, Hk_layer, d] keys or values as the cache holds them: [T, Hk, D]."""
        repeat = self.cache_kv_heads // self.num_kv_heads
        return self._padded(x.repeat_interleave(repeat, dim=1) if repeat > 1 else x)

    def quantize_fp8_(self) -> None:
        self.qkv_proj.quantize_fp8_()
        self.o_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """Checkpoint tensor name -> where it is stored."""
        q, kv = self.q_size, self.kv_size
        shards = [(f"{prefix}.q_proj", 0, q)]
        if not self.shared:
            shards.append((f"{prefix}.k_proj", q, kv))
            if not self.k_eq_v:
                shards.append((f"{prefix}.v_proj", q + kv, kv))
        slots = linear_slots(self.qkv_proj, shards, None)
        slots.update(linear_slots(self.o_proj, [(f"{prefix}.o_proj", 0, self.o_proj.out_features)], None))
        slots[f"{prefix}.q_norm.weight"] = ShardSlot(self.q_norm.weight)
        if self.k_norm is not None:
            slots[f"{prefix}.k_norm.weight"] = ShardSlot(self.k_norm.weight)
        return slots
