"""Multi-head latent attention (DeepSeek V2 / V3) on the engine's paged cache.

The paged cache holds what transformers caches: per token and layer, the
normed latent c = kv_a_layernorm(latent) (``kv_lora_rank`` dims) and the
rotated k_pe (``qk_rope_head_dim``, shared by every head), as ONE KV head
of width L = kv_lora_rank + qk_rope_head_dim (``MLAConfig.cache_head_dim``;
576 for DeepSeek-V3 instead of 2 * heads * 192 decompressed values). The
attention runs in the absorbed form vLLM's and SGLang's MLA backends use:
with W_UK[h] (qk_nope x kv_lora_rank) and W_UV[h] (v_head_dim x
kv_lora_rank) head h's rows of kv_b_proj,

    q_nope[h] . (W_UK[h] c) = (W_UK[h]^T q_nope[h]) . c

so each head's query becomes [W_UK[h]^T q_nope[h] | rope(q_pe[h])] and
every token's key is the one vector [c | rope(k_pe)]: multi-query attention
with one KV head of width L, on the engine's paged kernels (GQA with
``heads`` query heads per KV head). The value is the same vector (the
cache stores it once: ``ModelConfig.kv_planes``); its output's first
kv_lora_rank dims, softmax . c, give o[h] = W_UV[h] (softmax . c), and the
rope dims are dropped. Nothing is decompressed per step: kv_b_proj's weight
is read as W_UK / W_UV in place (an fp8 checkpoint's is dequantized once,
at load, to the model dtype: ``finish_load``). Prefill runs the same form
(one cache format); over a long prompt it costs more FLOPs than
decompressing keys and values (L-wide scores and outputs per head instead
of qk_head_dim / v_head_dim), which vLLM avoids with a separate prefill
path.

RoPE turns only the rope dims (the cos/sin table is ``qk_rope_head_dim``
wide: ``FamilyOptions.rotary_dim``), of q per head and of the one k_pe all
heads share (Kimi Linear: none; the rope dims pass as they are). DeepSeek
lays them out in adjacent pairs (2i, 2i+1) (``FamilyOptions.interleaved_rope``:
V2 always, V3 with ``rope_interleave``): each step gathers them even dims
first then odd (the copy the kernels need anyway), which turns the rotation
into the rotate-half one the kernels compute, with the same q . k; the cache
holds k_pe so permuted. Scores are scaled by ``FamilyOptions.attn_scale``
(YaRN's mscale folded in by the dialect).

The low-rank norms (q_a_layernorm, kv_a_layernorm) use transformers'
default epsilon, 1e-6, whatever ``rms_norm_eps`` says. Each projection but
kv_b_proj is an fp8 ``Linear`` where an fp8 checkpoint stores it so
(DeepSeek's 128x128 block-fp8 releases), and ``quantize_fp8_`` turns them
to fp8; kv_b_proj, read as two batched matrices, stays in the model dtype.
With tensor parallelism each rank holds its heads' rows of q_proj /
q_b_proj and kv_b_proj (so its W_UK / W_UV are its heads') and columns of
o_proj (``splitserve.engine.parallel.sharding``), the low-rank projections,
norms and the latent cache whole.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata, paged_attention_layer
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, RMSNorm, ShardSlot, linear_slots, norm_slots
from splitserve.engine.quantization import layer_groups
from splitserve.kernels import ops
from splitserve.kernels.fp8_gemm import dequantize_weight
from splitserve.kernels.lora import LoraMeta

LATENT_NORM_EPS = 1e-6  # DeepseekV2RMSNorm / DeepseekV3RMSNorm's default, given to the low-rank norms
_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


class MLAttention(nn.Module):
    """DeepSeek's attention, by its checkpoint names (``self_attn.q_a_proj``...)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "self_attn"):
        super().__init__()
        mla = self.mla = cfg.options.mla
        h, hidden = cfg.num_heads, cfg.hidden_size
        self.num_heads, self.head_dim, self.sliding_window = h, cfg.head_dim, sliding_window
        self.scale, self.interleaved = cfg.options.attn_scale, cfg.options.interleaved_rope
        self.dtype = dtype
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
        layer_cache: torch.Tensor,  # [planes, NB, BS, 1, L]
        meta: AttentionMetadata,
        cos_sin_cache: torch.Tensor | None,  # [max_position, qk_rope_head_dim] float32
        lora: LoraMeta | None = None,  # always None: DeepseekCausalLM refuses adapters
    ) -> torch.Tensor:
        t, h, m = x.shape[0], self.num_heads, self.mla
        nope, rope, rank = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))[0])
        q = q.view(t, h, m.qk_head_dim)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([rank, rope], dim=-1)
        c = self.kv_a_layernorm(latent.contiguous())[0]  # [T, rank]
        q_pe, k_pe = q[..., nope:], k_pe.view(t, 1, rope)
        if cos_sin_cache is not None:  # None: no RoPE (Kimi Linear), the rope dims pass as they are
            q_pe, k_pe = ops.rotary_embedding(positions, self._pairs(q_pe), self._pairs(k_pe), cos_sin_cache)
        w_uk, w_uv = self.kv_b_proj.weight.view(h, nope + m.v_head_dim, rank).split([nope, m.v_head_dim], 1)
        q_abs = torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, rank]
        q = torch.cat([q_abs, q_pe], dim=-1)  # [T, H, L]
        kv = torch.cat([c.view(t, 1, rank), k_pe], dim=-1)  # [T, 1, L]: key and value
        out = paged_attention_layer(q, kv, kv, layer_cache, meta, self.scale, self.sliding_window)
        out = torch.bmm(out[..., :rank].transpose(0, 1), w_uv.transpose(1, 2))  # [H, T, v_head_dim]
        return self.project_out(x, out.transpose(0, 1))

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

    @torch.no_grad()
    def finish_load(self) -> None:
        """Once the checkpoint is loaded: an fp8 kv_b_proj dequantized to the
        model dtype (the absorbed form reads its weight as W_UK / W_UV)."""
        kv_b = self.kv_b_proj
        if kv_b.weight_scale is not None:
            dense = Linear(kv_b.in_features, kv_b.out_features, False, self.dtype, kv_b.weight.device)
            dense.weight.copy_(dequantize_weight(kv_b.weight, kv_b.weight_scale, *kv_b.fp8_groups, self.dtype))
            self.kv_b_proj = dense

    def quantize_fp8_(self) -> None:
        for name in _PROJECTIONS:
            if name != "kv_b_proj" and (linear := getattr(self, name)) is not None:
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
