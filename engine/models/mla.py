"""Multi-head latent attention (DeepSeek V2 / V3) on the engine's paged cache.

transformers caches the compressed latent (``kv_lora_rank`` dims) and the
shared rotated key part (``qk_rope_head_dim``) per token and decompresses
them for every head at every step. Here each step decompresses only its own
tokens and caches the result: per head, the key [k_nope | rope(k_pe)]
(``qk_head_dim`` wide) and the value (``v_head_dim``), both zero-padded to
the cache's one head width D (``MLAConfig.cache_head_dim``), so that the
paged cache, its kernels, the prefix cache and the KV hand-off serve it
unchanged. Zero dims add nothing to q . k, and the value's zero dims give
zero output columns, dropped before o_proj. The cost: the cache holds
2 * heads * D values per token and layer instead of the latent's
kv_lora_rank + qk_rope_head_dim (e.g. 2 * 128 * 192 vs 576 for DeepSeek-V3).

RoPE turns only the rope dims (the cos/sin table is ``qk_rope_head_dim``
wide: ``FamilyOptions.rotary_dim``), of q per head and of the one k_pe all
heads share. DeepSeek lays them out in adjacent pairs (2i, 2i+1)
(``FamilyOptions.interleaved_rope``: V2 always, V3 with ``rope_interleave``):
each step gathers them even dims first then odd (the copy the kernels need
anyway), which turns the rotation into the rotate-half one the kernels
compute, with the same q . k. Scores are scaled by ``FamilyOptions.attn_scale``
(YaRN's mscale folded in by the dialect).

The low-rank norms (q_a_layernorm, kv_a_layernorm) use transformers'
default epsilon, 1e-6, whatever ``rms_norm_eps`` says. Each projection is
an fp8 ``Linear`` where an fp8 checkpoint stores it so (DeepSeek's 128x128
block-fp8 releases), and ``quantize_fp8_`` turns them all to fp8. With
tensor parallelism each rank holds its heads' rows of q_proj / q_b_proj and
kv_b_proj and columns of o_proj (``splitserve.engine.parallel.sharding``),
the low-rank projections and norms whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, RMSNorm, ShardSlot, linear_slots, norm_slots
from splitserve.engine.quantization import layer_groups
from splitserve.kernels import ops
from splitserve.kernels.lora import LoraMeta

LATENT_NORM_EPS = 1e-6  # DeepseekV2RMSNorm / DeepseekV3RMSNorm's default, given to the low-rank norms
_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., w] zero-padded on its last dim to ``width`` (contiguous)."""
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x.contiguous()


class MLAttention(nn.Module):
    """DeepSeek's attention, by its checkpoint names (``self_attn.q_a_proj``...)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "self_attn"):
        super().__init__()
        mla = self.mla = cfg.options.mla
        h, hidden = cfg.num_heads, cfg.hidden_size
        self.num_heads, self.head_dim, self.sliding_window = h, cfg.head_dim, sliding_window
        self.scale, self.interleaved = cfg.options.attn_scale, cfg.options.interleaved_rope
        self.quant = cfg.quantization

        def linear(name: str, d_in: int, d_out: int, bias: bool) -> Linear:
            # fp8 where the checkpoint stores this projection in fp8, with its scale groups
            groups = layer_groups(self.quant, [(f"{prefix}.{name}.weight", d_out)], d_in)
            return Linear(d_in, d_out, bias, dtype, device, fp8_groups=groups)

        qk = h * mla.qk_head_dim
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if mla.q_lora_rank:
            self.q_a_proj = linear("q_a_proj", hidden, mla.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, dtype, device)
            self.q_b_proj = linear("q_b_proj", mla.q_lora_rank, qk, False)
        else:
            self.q_proj = linear("q_proj", hidden, qk, False)
        latent = mla.kv_lora_rank + mla.qk_rope_head_dim
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", hidden, latent, cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, dtype, device)
        self.kv_b_proj = linear("kv_b_proj", mla.kv_lora_rank, h * (mla.qk_nope_head_dim + mla.v_head_dim),
                                False)
        self.o_proj = linear("o_proj", h * mla.v_head_dim, hidden, cfg.o_proj_bias)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        x: torch.Tensor,  # [T, hidden]
        layer_cache: torch.Tensor,  # [2, NB, BS, H, D]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,  # [max_position, qk_rope_head_dim] float32
        lora: LoraMeta | None = None,  # always None: DeepseekCausalLM refuses adapters
    ) -> torch.Tensor:
        t, h, m = x.shape[0], self.num_heads, self.mla
        nope, rope = m.qk_nope_head_dim, m.qk_rope_head_dim
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))[0])
        q = q.view(t, h, m.qk_head_dim)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent.contiguous())[0]).view(t, h, nope + m.v_head_dim)
        q_pe, k_pe = q[..., nope:], k_pe.view(t, 1, rope)
        if cos_sin_cache is not None:  # None: no RoPE (Kimi Linear), the rope dims pass as they are
            q_pe, k_pe = ops.rotary_embedding(positions, self._pairs(q_pe), self._pairs(k_pe), cos_sin_cache)
        d = self.head_dim
        q = _padded(torch.cat([q[..., :nope], q_pe], dim=-1), d)
        k = _padded(torch.cat([kv[..., :nope], k_pe.expand(t, h, rope)], dim=-1), d)
        v = _padded(kv[..., nope:], d)
        out = paged_attention_layer(q, k, v, layer_cache, meta, self.scale, self.sliding_window)  # [T, H, D]
        return self.project_out(x, out[..., :m.v_head_dim])

    def project_out(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [T, H, v_head_dim] through o_proj (``x``, the layer's
        input, for the families that gate the heads with it)."""
        return self.o_proj(out.reshape(out.shape[0], -1))

    def _pairs(self, x: torch.Tensor) -> torch.Tensor:
        """The rope dims [T, heads, rope] as the rotate-half kernels take them:
        contiguous, adjacent pairs (2i, 2i+1) split into evens then odds."""
        if self.interleaved:
            return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return x.contiguous()

    def quantize_fp8_(self) -> None:
        for name in _PROJECTIONS:
            if (linear := getattr(self, name)) is not None:
                linear.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots: dict[str, ShardSlot] = {}
        for name in _PROJECTIONS:
            if (linear := getattr(self, name)) is not None:
                slots.update(linear_slots(linear, [(f"{prefix}.{name}", 0, linear.out_features)], self.quant))
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            if (norm := getattr(self, name)) is not None:
                slots.update(norm_slots(f"{prefix}.{name}", norm))
        return slots


class MLADecoderLayer(DecoderLayer):
    """The Llama-style layer (norms, residual, MLP or experts) with ``MLAttention``."""

    attention_class = MLAttention
