"""Qwen3-Next (``Qwen3NextForCausalLM``, transformers' ``qwen3_next``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' Qwen3NextConfig and its model read it:

- ``layer_types``: each layer ``linear_attention`` (a Gated DeltaNet layer,
  ``splitserve.engine.models.gated_delta_net``, its state in the engine's
  recurrent-state store) or ``full_attention``; without it every
  ``full_attention_interval``-th layer (4) attends;
- Gated DeltaNet: ``linear_num_key_heads`` (16) q/k heads of
  ``linear_key_head_dim`` (128), ``linear_num_value_heads`` (32) value heads
  of ``linear_value_head_dim`` (128), a convolution of
  ``linear_conv_kernel_dim`` (4) taps; its projections fused per key head
  (``in_proj_qkvz``, ``in_proj_ba``);
- attention: ``q_proj`` gives each head's query and output gate, per-head
  q/k norms, ``partial_rotary_factor`` (0.25) of each head rotated;
  ``head_dim`` 256, 16 heads, 2 KV heads;
- every RMSNorm scales by 1 + weight, the product in float32 (the Gated
  DeltaNet's output norm by its weight);
- Qwen2-MoE's sparse MLP where ``num_experts`` > 0 (512, top 10,
  ``norm_topk_prob`` true, ``moe_intermediate_size`` 512, a sigmoid-gated
  shared expert of ``shared_expert_intermediate_size`` 512), on layers
  ``decoder_sparse_step`` and ``mlp_only_layers`` select; dense MLPs of
  ``intermediate_size`` elsewhere.

Refused: activations other than SiLU, sliding windows, a convolution of
fewer than 2 taps, fp8 checkpoints (their projections are regrouped per key
head here). LoRA adapters take the attention and Gated DeltaNet projections
(``HybridCausalLM.takes_lora``). Tensor parallelism splits the Gated DeltaNet
layers by key heads (``splitserve.engine.parallel.plan``). A hybrid model's
engine caches prefixes with state checkpoints; speculative decoding rolls
its states back to the accepted drafts.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, GatedDeltaNetShape, HybridLayout

ARCH = "Qwen3NextForCausalLM"
GATED_DELTA_NET = "gated_delta_net"
# keys read as Llama's, with transformers' Qwen3NextConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
           "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "rope_parameters": None, "rope_scaling": None, "rope_theta": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "bos_token_id": None,
           "eos_token_id": None}
_MOE_DEFAULTS = {"num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                 "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": []}
_GDN_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                 "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}
DEFAULT_ROTARY_FACTOR = 0.25


def layer_kinds(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Each layer's kind from ``layer_types`` (or ``full_attention_interval``)."""
    types = cfg.get("layer_types")
    if types is None:
        every = int(cfg.get("full_attention_interval") or 4)
        if every <= 0:
            raise ValueError(f"full_attention_interval must be positive, got {every}")
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    kinds = {"full_attention": ATTENTION, "linear_attention": GATED_DELTA_NET}
    unknown = sorted({t for t in types if t not in kinds})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported; supported: full_attention, linear_attention")
    return tuple(kinds[t] for t in types)


def rotary_dim(cfg: dict[str, Any], head_dim: int) -> int | None:
    """Rotated dims of each head from ``partial_rotary_factor`` (top level or in
    the rope dict; 0.25 when neither names one); None: all of them."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = float(rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor")
                   or DEFAULT_ROTARY_FACTOR)
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotated dims of {head_dim}; "
                         "an even number in (0, head_dim] is needed")
    return None if dim == head_dim else dim


def gated_delta_net_shape(cfg: dict[str, Any], fused: bool) -> GatedDeltaNetShape:
    full = {**_GDN_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    kernel = int(full["linear_conv_kernel_dim"])
    if kernel < 2:
        raise ValueError(f"linear_conv_kernel_dim {kernel} is not supported (at least 2 taps)")
    return GatedDeltaNetShape(num_k_heads=int(full["linear_num_key_heads"]),
                              num_v_heads=int(full["linear_num_value_heads"]),
                              k_head_dim=int(full["linear_key_head_dim"]),
                              v_head_dim=int(full["linear_value_head_dim"]),
                              conv_kernel=kernel, fused_projections=fused)


def refuse_windows(cfg: dict[str, Any], family: str) -> None:
    if cfg.get("use_sliding_window") or cfg.get("sliding_window"):
        raise ValueError(f"sliding windows are not supported for {family}")


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    refuse_windows(cfg, "qwen3_next")
    merged = {**_PASSED, **_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    out = passed_keys(cfg, _PASSED)
    out.update(qk_norm=True, mlp_bias=False, attention_out_bias=False)
    if int(merged["num_experts"]) > 0:
        out.update({k: merged[k] for k in _MOE_DEFAULTS})
    return out


def hybrid_options(cfg: dict[str, Any], family: str, fused: bool) -> dict[str, Any]:
    """The FamilyOptions fields Qwen3-Next and Qwen3.5 share."""
    merged = {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}
    shape = gated_delta_net_shape(cfg, fused)
    kinds = layer_kinds(cfg, int(merged["num_hidden_layers"]))
    head_dim = int(merged.get("head_dim") or int(merged["hidden_size"]) // int(merged["num_attention_heads"]))
    return dict(hidden_act=checked_activation(cfg, family), norm_plus_one=True, norm_fp32_product=True,
                rotary_dim=rotary_dim(cfg, head_dim), hybrid=HybridLayout(kinds, shape.states()),
                gated_delta_net=shape)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its Gated DeltaNet projections are regrouped per key head")
    return FamilyOptions(**hybrid_options(cfg, "qwen3_next", fused=True))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
