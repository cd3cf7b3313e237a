"""dots.llm1 (``Dots1ForCausalLM``): GLM-4.5's mixture of experts
(``splitserve.engine.dialects.glm4_moe``: the grouped sigmoid router with its
correction bias, ungated shared experts, dense first layers) in a
Qwen3-style decoder, read from config.json as transformers' ``Dots1Config``
does.

- ``n_routed_experts``, ``num_experts_per_tok`` and ``n_shared_experts``
  have no defaults there: config.json must hold them (0 or null shared
  experts: none); ``moe_intermediate_size`` defaults to 1408,
  ``first_k_dense_replace`` to 0, ``norm_topk_prob`` to off;
- per-head RMSNorm on q and k before RoPE, always; RoPE over the whole head
  (transformers' Dots1 ignores any ``partial_rotary_factor``);
- ``attention_bias`` covers q/k/v and o_proj; the MLPs have none;
- sliding windows: ``layer_types`` per layer, by default the layers from
  ``max_window_layers`` (62) on slide over ``sliding_window`` (4096) tokens
  when it is set;
- defaults: KV heads as query heads, eps 1e-6, 2048 positions, untied
  embeddings.

Refused as for GLM-4.5: uneven router groups, activations other than SiLU,
fp8 checkpoints.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rope_theta", "torch_dtype", "dtype", "bos_token_id",
           "eos_token_id")
# transformers' Dots1Config defaults, where config.json has no such key
_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
             "attention_bias": False}


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters / rope_scaling less the partial_rotary_factor Dots1 never applies."""
    out = {}
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            out[key] = {k: v for k, v in cfg[key].items() if k != "partial_rotary_factor"}
    return out


def _layer_types(cfg: dict[str, Any]) -> list[str]:
    layers = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window", 4096)
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", 62))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    types = checked_layer_types(types, layers, "dots1")
    if window is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**passed_keys(cfg, {**{k: None for k in _COPIED}, **_DEFAULTS}), **_rope(cfg),
            **moe_keys({**cfg, "moe_intermediate_size": cfg.get("moe_intermediate_size") or 1408},
                       "dots1", first_dense=0, norm_topk=False),
            "qk_norm": True, "mlp_bias": False,
            "use_sliding_window": True, "sliding_window": cfg.get("sliding_window", 4096),
            "layer_types": _layer_types(cfg)}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Dots1ForCausalLM", "untested: the float32 router and its "
                          "correction bias beside fp8 experts")
    return FamilyOptions(hidden_act=checked_activation(cfg, "dots1"))


DIALECT = Dialect(architectures=("Dots1ForCausalLM",), llama_keys=llama_keys, options=options)
