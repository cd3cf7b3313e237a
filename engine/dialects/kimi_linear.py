"""Kimi Linear (``KimiLinearForCausalLM``, transformers' ``kimi_linear``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' KimiLinearConfig and its model read it:

- ``layer_types``: each layer ``linear_attention`` (Kimi Delta Attention,
  ``splitserve.engine.models.kimi_delta``, its state in the engine's
  recurrent-state store) or ``full_attention`` (DeepSeek's multi-head latent
  attention, ``splitserve.engine.models.mla``, with no RoPE at all: the
  rope dims of q and of the shared k_pe pass unrotated); without it, from
  ``linear_attn_config``'s 1-based ``full_attn_layers`` / ``kda_layers``,
  else every 4th layer from layer 4 (0-based) attends;
- KDA: ``linear_num_heads`` (32) heads of ``linear_head_dim`` (128),
  convolutions of ``linear_conv_kernel_dim`` (4) taps; the original
  checkpoints' ``linear_attn_config`` ``num_heads`` / ``head_dim`` /
  ``short_conv_kernel_size`` take precedence;
- latent attention: ``q_lora_rank`` (null: a plain q_proj), ``kv_lora_rank``
  (512), ``qk_nope_head_dim`` (128), ``qk_rope_head_dim`` (64), ``v_head_dim``
  (128), scores scaled by 1 / sqrt(nope + rope); ``attention_bias`` on
  q_a_proj, kv_a_proj_with_mqa and o_proj; ``head_dim`` is not read (the
  config class sets it to ``qk_rope_head_dim``);
- DeepSeek-V3's grouped sigmoid router (``splitserve.engine.models.grouped_router``)
  over ``num_experts`` (256) of ``moe_intermediate_size`` (1024),
  ``num_experts_per_token`` (8), ``num_expert_group`` (1), ``topk_group``
  (1), ``moe_renormalize`` (on), ``routed_scaling_factor`` (2.446), one
  ungated shared MLP of ``num_shared_experts`` (1) expert widths; the config
  class's other names for these (``num_local_experts``,
  ``num_experts_per_tok``, ``n_group``, ``norm_topk_prob``,
  ``n_shared_experts``) are read where the first are absent;
  ``mlp_layer_types`` ("dense" / "sparse"; default: the first
  ``first_k_dense_replace`` (1) layers dense);
- ``model_max_length`` (or ``max_position_embeddings``, 1048576) positions;
  plain RMSNorms (eps ``rms_norm_eps``, 1e-5; the latent norms 1e-6);
- ``lm_head`` never tied to the embeddings, whatever ``tie_word_embeddings``
  says (transformers' KimiLinearForCausalLM ties no weights).

Refused: ``mla_use_nope`` false (transformers' Kimi Linear rotates nothing),
a ``moe_router_activation_func`` other than sigmoid, activations other than
SiLU, KV heads other than the head count, convolutions of fewer than 2 taps,
fp8 checkpoints (the convolutions are stacked at load), tensor parallelism
(the recurrent layers are not sharded), LoRA adapters. A hybrid model's
engine caches prefixes with state checkpoints; speculative decoding rolls its states back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.deepseek_v2 import mla_options
from splitserve.engine.dialects.glm4_moe_lite import latent_moe_keys
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, GatedDeltaNetShape, HybridLayout

ARCH = "KimiLinearForCausalLM"
KIMI_DELTA = "kimi_delta_attention"
# transformers' KimiLinearConfig defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 27,
             "num_attention_heads": 32, "rms_norm_eps": 1e-5, "attention_bias": False, "bos_token_id": 163584, "eos_token_id": 163586,
             "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
             "v_head_dim": 128, "moe_intermediate_size": 1024, "topk_group": 1, "routed_scaling_factor": 2.446}
# DeepSeek-V3's key <- (the name KimiLinearConfig saves, its attribute_map alias), default
_ALIASED = {"n_routed_experts": (("num_experts", "num_local_experts"), 256),
            "num_experts_per_tok": (("num_experts_per_token", "num_experts_per_tok"), 8),
            "n_shared_experts": (("num_shared_experts", "n_shared_experts"), 1),
            "n_group": (("num_expert_group", "n_group"), 1),
            "norm_topk_prob": (("moe_renormalize", "norm_topk_prob"), True),
            "max_position_embeddings": (("model_max_length", "max_position_embeddings"), 1048576)}
_LINEAR = {"linear_num_heads": ("num_heads", 32), "linear_head_dim": ("head_dim", 128),
           "linear_conv_kernel_dim": ("short_conv_kernel_size", 4)}
_NOT_READ = ("head_dim", "rope_theta", "rope_parameters", "rope_scaling")  # transformers ignores them


def _first(cfg: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), default)


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers' defaults filled in, under DeepSeek-V3's
    names; the keys it ignores dropped. Raises for what is refused."""
    if cfg.get("mla_use_nope") is False:
        raise ValueError(f"mla_use_nope false is not supported for {ARCH} (transformers' Kimi Linear "
                         "applies no RoPE in its latent attention)")
    router_act = cfg.get("moe_router_activation_func") or "sigmoid"
    if router_act != "sigmoid":
        raise ValueError(f"moe_router_activation_func {router_act!r} is not supported for {ARCH}; "
                         "supported: sigmoid")
    out = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k not in _NOT_READ}}
    for key, (names, default) in _ALIASED.items():
        out[key] = _first(cfg, names, default)
    if cfg.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def layer_kinds(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """Each layer's kind: ``layer_types``, else ``linear_attn_config``'s 1-based
    layer lists, else full attention on layers 4, 8, ... (0-based)."""
    types = cfg.get("layer_types")
    linear = cfg.get("linear_attn_config") or {}
    if types is None and "full_attn_layers" in linear and "kda_layers" in linear:
        types = [None] * num_layers
        for kind, key in (("full_attention", "full_attn_layers"), ("linear_attention", "kda_layers")):
            for layer in linear[key]:
                if not 1 <= int(layer) <= num_layers:
                    raise ValueError(f"linear_attn_config {key} names layer {layer} of {num_layers} (1-based)")
                types[int(layer) - 1] = kind
    elif types is None:
        types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    kinds = {"full_attention": ATTENTION, "linear_attention": KIMI_DELTA}
    unknown = sorted({str(t) for t in types if t not in kinds})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (a layer without a type included); "
                         "supported: full_attention, linear_attention")
    return tuple(kinds[t] for t in types)


def mlp_layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    """Each layer's MLP, "dense" or "sparse" (default: the first
    ``first_k_dense_replace``, 1, dense)."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        first = int(cfg.get("first_k_dense_replace", 1) or 0)
        types = ["dense" if i < first else "sparse" for i in range(num_layers)]
    if len(types) != num_layers or any(t not in ("dense", "sparse") for t in types):
        raise ValueError(f"mlp_layer_types must give each of the {num_layers} layers dense or sparse, "
                         f"got {types!r}")
    return list(types)


def kimi_delta_shape(cfg: dict[str, Any]) -> GatedDeltaNetShape:
    """The KDA layers' heads, head width and convolution taps (values as wide as keys)."""
    linear = cfg.get("linear_attn_config") or {}
    dims = {key: int(linear.get(inner) or cfg.get(key) or default) for key, (inner, default) in _LINEAR.items()}
    if dims["linear_conv_kernel_dim"] < 2:
        raise ValueError(f"linear_conv_kernel_dim (linear_attn_config short_conv_kernel_size) "
                         f"{dims['linear_conv_kernel_dim']} is not supported (at least 2 taps)")
    heads, head_dim = dims["linear_num_heads"], dims["linear_head_dim"]
    return GatedDeltaNetShape(num_k_heads=heads, num_v_heads=heads, k_head_dim=head_dim, v_head_dim=head_dim,
                              conv_kernel=dims["linear_conv_kernel_dim"], fused_projections=False)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = full_config(cfg)
    layers = int(full["num_hidden_layers"])
    keys = latent_moe_keys(full, "kimi_linear", ARCH, mlp_layer_types(full, layers))
    return {**keys, "tie_word_embeddings": False}  # transformers' model never ties them


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its q/k/v convolutions are stacked at load")
    full = full_config(cfg)
    shape = kimi_delta_shape(full)
    kinds = layer_kinds(full, int(full["num_hidden_layers"]))
    opts = mla_options(full, "kimi_linear", ARCH, interleaved=False, mtp_layers=0)
    return dataclasses.replace(opts, hybrid=HybridLayout(kinds, shape.states()), gated_delta_net=shape,
                               tensor_parallel_refusal="kimi_linear's recurrent (Kimi Delta Attention) "
                                                       "layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
