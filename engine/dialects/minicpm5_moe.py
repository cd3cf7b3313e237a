"""MiniCPM5-MoE (``MiniCPM5MoeForCausalLM``; ``MiniCPM5MoEForCausalLM`` its
older name): its config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' MiniCPM5MoeConfig and its model read it:

- Llama's grouped-query attention, RoPE over every dim of each head (base
  5000000 by default), each head's output gated by the sigmoid of a second
  projection stored beside its query rows in ``q_proj``
  (``splitserve.engine.models.minicpm5_moe``); ``attention_bias`` covers
  q/gate, k, v and o;
- DeepSeek-V3's mixture of experts (``splitserve.engine.dialects.glm4_moe``'s
  grouped sigmoid router with its correction bias, float32):
  ``n_routed_experts`` (160) of ``moe_intermediate_size`` (512),
  ``num_experts_per_tok`` (16), ``n_group`` / ``topk_group`` (1),
  ``norm_topk_prob`` (on), ``routed_scaling_factor`` (3.66); one ungated
  shared MLP of ``moe_intermediate_size * n_shared_experts`` (1);
- ``mlp_layer_types`` marks each layer ``dense`` (an MLP of
  ``intermediate_size``, 8192) or ``sparse``; without it the first
  ``first_k_dense_replace`` (1) layers are dense;
- defaults: 32 heads of 128 dims, 2 KV heads, eps 1e-6, untied embeddings,
  ``max_position_embeddings`` 524288.

Refused: ``use_gated_attention`` false (transformers refuses it too),
activations other than SiLU, ``partial_rotary_factor``, uneven router
groups, fp8 checkpoints (q_proj's rows are split at load), tensor
parallelism (untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary)
from splitserve.engine.dialects.exaone_moe import mlp_layer_types
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

ARCHS = ("MiniCPM5MoeForCausalLM", "MiniCPM5MoEForCausalLM")
# keys read as Llama's, with transformers' MiniCPM5MoeConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 130560, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "rope_theta": None,
           "rope_parameters": None, "rope_scaling": None, "torch_dtype": None, "dtype": None,
           "bos_token_id": 0, "eos_token_id": [1, 130073], "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "max_position_embeddings": 524288}
_MOE_DEFAULTS = {"n_routed_experts": 160, "num_experts_per_tok": 16, "moe_intermediate_size": 512,
                 "n_shared_experts": 1, "routed_scaling_factor": 3.66, "n_group": 1, "topk_group": 1}
DEFAULT_ROPE_THETA = 5_000_000.0


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    merged = {**_PASSED, **_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:
        merged["n_routed_experts"] = cfg["num_local_experts"]  # attribute_map's other name
    moe = moe_keys(merged, "minicpm5_moe", first_dense=1, norm_topk=True)
    moe["mlp_only_layers"] = [i for i, t in enumerate(mlp_layer_types(merged, "minicpm5_moe", 1))
                              if t == "dense"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    bias = bool(cfg.get("attention_bias", False))
    return {**passed_keys(cfg, _PASSED), **moe, "attention_bias": bias, "attention_out_bias": bias,
            "mlp_bias": False, "qk_norm": False,
            "rope_theta": rope.get("rope_theta") or cfg.get("rope_theta") or DEFAULT_ROPE_THETA}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCHS[0], "q_proj's query and gate rows are split at load")
    if cfg.get("use_gated_attention", True) is False:
        raise ValueError(f"use_gated_attention false is not supported for {ARCHS[0]} (transformers "
                         "requires the gated attention too)")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, ARCHS[0])
    mlp_layer_types({**_PASSED, **cfg}, "minicpm5_moe", 1)
    return FamilyOptions(hidden_act=checked_activation(cfg, "minicpm5_moe"),
                         tensor_parallel_refusal="its gated attention (q_proj rows split into query "
                                                 "and gate at load) is untested across ranks "
                                                 "(MiniCPM5-MoE)")


DIALECT = Dialect(architectures=ARCHS, llama_keys=llama_keys, options=options)
