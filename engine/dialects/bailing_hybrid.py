"""inclusionAI's Bailing hybrid (Ling 3, ``BailingHybridForCausalLM``,
transformers' ``bailing_hybrid``): its config.json in Llama's keys, and its
``FamilyOptions``.

As transformers' BailingHybridConfig and its model read it:

- ``layer_types``: each layer ``linear_attention`` (Kimi Delta Attention
  with Bailing's gates, ``splitserve.engine.models.bailing_hybrid``, its
  state in the engine's recurrent-state store) or ``full_attention``
  (DeepSeek's latent attention with RoPE on adjacent pairs and a sigmoid
  gate per head); default: the last layer of every ``layer_group_size`` (6)
  attends;
- KDA: ``num_attention_heads`` heads of ``head_dim`` (128; the config class
  reads the latent attention's rope width into its own ``head_dim``, the
  KDA layers keep config.json's), convolutions of ``short_conv_kernel_size``
  (4) taps; the forget gate bounded, ``kda_lower_bound`` (-5) times
  sigmoid(exp(A_log) * (f + dt_bias)), with ``kda_safe_gate`` (on), else
  -exp(A_log) * softplus(f + dt_bias);
- latent attention: ``q_lora_rank`` (null: a plain q_proj), ``kv_lora_rank``
  (512), ``qk_nope_head_dim`` (128), ``qk_rope_head_dim`` (64),
  ``v_head_dim`` (128), ``attention_bias`` on q_a_proj, kv_a_proj_with_mqa
  and o_proj; RoPE base ``rope_theta`` (6e6) unless ``rope_parameters``;
- DeepSeek-V3's grouped sigmoid router over ``num_experts`` (512) of
  ``moe_intermediate_size`` (768), ``num_experts_per_token`` (8),
  ``num_expert_group`` (8), ``topk_group`` (4), ``moe_renormalize`` (on),
  ``routed_scaling_factor`` (2.5), one ungated shared MLP of
  ``num_shared_experts`` (1) expert widths (the config class's other names
  read where these are absent); ``mlp_layer_types`` ("dense" / "sparse";
  default: the first ``first_k_dense_replace`` (2) dense, of
  ``intermediate_size``);
- the ``num_nextn_predict_layers`` (1) multi-token-prediction layers after
  the last are skipped at load; ``lm_head`` is never tied.

Refused: SwiGLU limits (nonzero ``expert_swiglu_limit_list`` /
``share_expert_swiglu_limit_list`` entries), KV heads other than the head
count, activations other than SiLU, convolutions of fewer than 2 taps,
fp8 checkpoints (renamed and stacked tensors), tensor parallelism (the
recurrent layers are not sharded), LoRA adapters. A hybrid model's engine
caches prefixes with state checkpoints; speculative decoding rolls its states back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.deepseek_v2 import mla_options
from splitserve.engine.dialects.glm4_moe_lite import latent_moe_keys
from splitserve.engine.dialects.kimi_linear import layer_kinds, mlp_layer_types
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import GatedDeltaNetShape, HybridLayout

ARCH = "BailingHybridForCausalLM"
# transformers' BailingHybridConfig defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 157184, "hidden_size": 2560, "intermediate_size": 6144, "num_hidden_layers": 42,
             "num_attention_heads": 32, "rms_norm_eps": 1e-6, "attention_bias": False, "eos_token_id": 156895,
             "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
             "v_head_dim": 128, "moe_intermediate_size": 768, "topk_group": 4, "routed_scaling_factor": 2.5,
             "first_k_dense_replace": 2, "tie_word_embeddings": False}
# the key read here <- (the name BailingHybridConfig saves, its attribute_map alias), default
_ALIASED = {"n_routed_experts": (("num_experts", "num_local_experts"), 512),
            "num_experts_per_tok": (("num_experts_per_token", "num_experts_per_tok"), 8),
            "n_shared_experts": (("num_shared_experts", "n_shared_experts"), 1),
            "n_group": (("num_expert_group", "n_group"), 8),
            "norm_topk_prob": (("moe_renormalize", "norm_topk_prob"), True),
            "max_position_embeddings": (("model_max_length", "max_position_embeddings"), 262144),
            "num_mtp_layers": (("num_nextn_predict_layers", "num_mtp_layers"), 1)}
_LIMITS = (("expert_swiglu_limit_list", "swiglu_limits"), ("share_expert_swiglu_limit_list", "swiglu_limits_shared"))
DEFAULT_THETA = 6_000_000.0


def _first(cfg: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), default)


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers' defaults filled in under DeepSeek-V3's
    names, the layer types derived; ``head_dim`` dropped (the KDA width,
    ``kda_shape`` reads it). Raises for what is refused."""
    out = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k != "head_dim"}}
    for key, (names, default) in _ALIASED.items():
        out[key] = _first(cfg, names, default)
    if cfg.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta") or DEFAULT_THETA)}
    layers = int(out["num_hidden_layers"])
    if out.get("layer_types") is None:
        group = int(cfg.get("layer_group_size") or 6)
        out["layer_types"] = ["full_attention" if (i + 1) % group == 0 else "linear_attention" for i in range(layers)]
    for names in _LIMITS:
        limits = _first(cfg, names, None)
        if limits is not None and (len(limits) != layers or any(float(x) for x in limits)):
            raise ValueError(f"{names[0]} {list(limits)} is not supported for {ARCH} (clamped SwiGLU experts); "
                             "only zeros, one per layer")
    return out


def kda_shape(cfg: dict[str, Any]) -> GatedDeltaNetShape:
    """The KDA layers: a head per attention head, of config.json's ``head_dim``."""
    heads, head_dim = int(cfg.get("num_attention_heads") or 32), int(cfg.get("head_dim") or 128)
    kernel = int(cfg.get("short_conv_kernel_size") or 4)
    if kernel < 2:
        raise ValueError(f"short_conv_kernel_size {kernel} is not supported (at least 2 taps)")
    bound = float(cfg.get("kda_lower_bound", -5.0)) if cfg.get("kda_safe_gate", True) else None
    return GatedDeltaNetShape(num_k_heads=heads, num_v_heads=heads, k_head_dim=head_dim, v_head_dim=head_dim,
                              conv_kernel=kernel, fused_projections=False, forget_gate_bound=bound)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = full_config(cfg)
    keys = latent_moe_keys(full, "bailing_hybrid", ARCH, mlp_layer_types(full, int(full["num_hidden_layers"])))
    return {**keys, "tie_word_embeddings": False}  # transformers' model ties no weights


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed and its q/k/v convolutions stacked at load")
    full = full_config(cfg)
    shape = kda_shape(cfg)
    kinds = layer_kinds(full, int(full["num_hidden_layers"]))
    mtp = int(full["num_mtp_layers"] or 0)
    opts = mla_options(full, "bailing_hybrid", ARCH, interleaved=True, mtp_layers=mtp)
    return dataclasses.replace(opts, hybrid=HybridLayout(kinds, shape.states()), gated_delta_net=shape,
                               tensor_parallel_refusal="bailing_hybrid's recurrent (Kimi Delta Attention) "
                                                       "layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
