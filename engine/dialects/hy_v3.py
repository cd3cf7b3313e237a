"""Tencent Hy3 (``HYV3ForCausalLM``, transformers' ``hy_v3``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' HYV3Config and its model read it:

- Llama's attention with per-head q/k RMSNorms before RoPE (Apertus'):
  ``attention_bias`` on q/k/v and o alike; every dim of each head rotates,
  RoPE base 11158840 unless ``rope_parameters`` gives one;
- ``mlp_layer_types`` marks each layer ``dense`` (a SwiGLU MLP of
  ``intermediate_size``) or ``sparse``; without it layer 0 is dense and the
  rest sparse;
- the sparse layers: ``num_experts`` (192; ``num_local_experts`` its other
  name) SwiGLU experts of ``moe_intermediate_size`` (1536),
  ``num_experts_per_tok`` (8) per token chosen in float32 by sigmoid scores
  plus the checkpoint's correction bias, the chosen experts' unbiased scores
  renormalised (always) and times ``router_scaling_factor`` (2.826): GLM-4.5's
  grouped router with a single group
  (``splitserve.engine.models.grouped_router``); one ungated shared MLP of
  ``moe_intermediate_size * num_shared_experts`` (1) added to the routed
  output (``enable_moe_fp32_combine`` adds the two in float32 and rounds
  once, which is what adding them in the model dtype does);
- defaults: 64 heads, 8 KV heads, head_dim 128, eps 1e-5, untied
  embeddings.

Refused: activations other than SiLU, ``mlp_bias`` (the shared and dense
MLPs' biases), ``partial_rotary_factor`` (transformers' Llama rotary code
rotates every dim), fewer than 2 experts, ``mlp_layer_types`` other than
dense/sparse, fp8 checkpoints (untested: the float32 router, renamed at
load, beside fp8 experts), tensor parallelism (untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary)
from splitserve.engine.dialects.exaone_moe import mlp_layer_types
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

ARCH = "HYV3ForCausalLM"
DEFAULT_THETA = 11158840.0  # HYV3Config.default_theta
# keys read as Llama's, with transformers' HYV3Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 120832, "hidden_size": 4096, "intermediate_size": 13312,
           "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
           "head_dim": 128, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": None, "eos_token_id": None,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
           "attention_bias": False}
# HYV3Config's mixture-of-experts defaults
_MOE_DEFAULTS = {"num_experts": 192, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
                 "num_shared_experts": 1, "router_scaling_factor": 2.826}


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    return rope if isinstance(rope, dict) else {}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported for hy_v3 (the shared experts carry no biases here)")
    refuse_partial_rotary(cfg, _rope(cfg), "hy_v3")
    merged = {**_PASSED, **_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    experts = int(merged.get("num_local_experts") or merged["num_experts"])
    if experts < 2:
        raise ValueError(f"num_experts must be at least 2, got {experts}")
    routed = moe_keys({**merged, "n_routed_experts": experts, "n_shared_experts": merged["num_shared_experts"],
                       "routed_scaling_factor": merged["router_scaling_factor"], "norm_topk_prob": True,
                       "n_group": 1, "topk_group": 1}, "hy_v3", first_dense=1, norm_topk=True)
    # transformers reads mlp_layer_types only (a first_k_dense_replace key is not HYV3Config's)
    types = mlp_layer_types({k: v for k, v in merged.items() if k != "first_k_dense_replace"},
                            "hy_v3", first_dense=1)
    routed["mlp_only_layers"] = [i for i, t in enumerate(types) if t == "dense"]
    out = passed_keys(cfg, _PASSED)
    if _rope(cfg).get("rope_theta") is None:
        out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    out.update(routed, mlp_bias=False, qk_norm=True)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the float32 router and its correction bias, "
                          "renamed at load, beside fp8 experts")
    mtp = int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 1)) or 0)
    if mtp < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {mtp}")
    return FamilyOptions(hidden_act=checked_activation(cfg, "hy_v3"), mtp_layers=mtp,
                         tensor_parallel_refusal="its sigmoid router beside per-head q/k norms (Hy3) "
                                                 "is untested across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
