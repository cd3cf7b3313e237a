"""Building blocks of the Llama-style decoder: fused projections, attention, MLP.

Parameters are allocated uninitialised on the target device and dtype and
filled by ``CausalLM.load_weights``; nothing here draws random numbers.
Checkpoint tensors that this code fuses (q/k/v, gate/up) are written into
row ranges of one weight, described by ``ShardSlot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.kernels import ops


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


@dataclass(frozen=True)
class ShardSlot:
    """Where one checkpoint tensor lands: rows [start, start + size) of ``param``."""

    param: nn.Parameter
    start: int | None = None  # None: the whole parameter
    size: int | None = None

    @property
    def target(self) -> torch.Tensor:
        if self.start is None:
            return self.param.data
        return self.param.data.narrow(0, self.start, self.size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: [N, dim]; with residual returns (norm(x + residual), x + residual)
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Module):
    """y = x W^T (+ b); weight [out, in] as checkpoints store it."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = empty_param(d_out, d_in, dtype=dtype, device=device)
        self.bias = empty_param(d_out, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0):
        super().__init__()
        self.sliding_window = sliding_window  # 0: attends to the whole context
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        # q, k and v in one matmul: rows [q | k | v]
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, dtype, device
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_proj_bias, dtype, device)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, Hk, D]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,  # [max_position, D] float32
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Kernels (rotary in place, store, attention) take contiguous [T, H, D].
        q = q.reshape(t, self.num_heads, self.head_dim).contiguous()
        k = k.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        v = v.reshape(t, self.num_kv_heads, self.head_dim).contiguous()
        if self.q_norm is not None:
            # Qwen3: RMSNorm over each head's D dims, before RoPE
            q = self.q_norm(q.view(-1, self.head_dim))[0].view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.view(-1, self.head_dim))[0].view(t, self.num_kv_heads, self.head_dim)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin_cache)
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale,
                                    self.sliding_window)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """Checkpoint tensor name -> where it is stored."""
        q, kv = self.q_size, self.kv_size
        slots = {}
        for kind in ("weight", "bias") if self.qkv_proj.bias is not None else ("weight",):
            fused = getattr(self.qkv_proj, kind)
            slots[f"{prefix}.q_proj.{kind}"] = ShardSlot(fused, 0, q)
            slots[f"{prefix}.k_proj.{kind}"] = ShardSlot(fused, q, kv)
            slots[f"{prefix}.v_proj.{kind}"] = ShardSlot(fused, q + kv, kv)
        slots[f"{prefix}.o_proj.weight"] = ShardSlot(self.o_proj.weight)
        if self.o_proj.bias is not None:
            slots[f"{prefix}.o_proj.bias"] = ShardSlot(self.o_proj.bias)
        if self.q_norm is not None:
            slots[f"{prefix}.q_norm.weight"] = ShardSlot(self.q_norm.weight)
            slots[f"{prefix}.k_norm.weight"] = ShardSlot(self.k_norm.weight)
        return slots


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        # gate and up in one matmul: rows [gate | up], as silu_and_mul expects
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.intermediate, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(self.intermediate, cfg.hidden_size, cfg.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, 2I] -> [T, I] -> [T, hidden]
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        i = self.intermediate
        slots = {}
        for kind in ("weight", "bias") if self.gate_up_proj.bias is not None else ("weight",):
            fused = getattr(self.gate_up_proj, kind)
            slots[f"{prefix}.gate_proj.{kind}"] = ShardSlot(fused, 0, i)
            slots[f"{prefix}.up_proj.{kind}"] = ShardSlot(fused, i, i)
            slots[f"{prefix}.down_proj.{kind}"] = ShardSlot(getattr(self.down_proj, kind))
        return slots


class DecoderLayer(nn.Module):
    """Attention then an MLP, each behind an RMSNorm. ``mlp`` replaces the
    dense MLP (mixture-of-experts layers); ``mlp_name`` is its name in
    checkpoints (Mixtral's is ``block_sparse_moe``)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, mlp: nn.Module | None = None, mlp_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, dtype, device, sliding_window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = mlp if mlp is not None else MLP(cfg, dtype, device)
        self.mlp_name = mlp_name

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]: previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, hidden] residual stream; None before layer 0
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: layer output stays
        # separate from the stream until the following rms_norm sums them.
        if residual is None:
            residual = x
            h, _ = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, layer_cache, meta, cos_sin_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {
            f"{prefix}.input_layernorm.weight": ShardSlot(self.input_layernorm.weight),
            f"{prefix}.post_attention_layernorm.weight": ShardSlot(self.post_attention_layernorm.weight),
            **self.self_attn.weight_slots(f"{prefix}.self_attn"),
            **self.mlp.weight_slots(f"{prefix}.{self.mlp_name}"),
        }
