"""Cohere 2 MoE (``Cohere2MoeForCausalLM``): its config.json in Llama's keys,
and its ``FamilyOptions``.

Cohere 2's decoder (``splitserve.engine.dialects.cohere2``: the parallel
residual on one norm, interleaved RoPE pairs, ``logit_scale``, q/k/v/o
biases per ``attention_bias``, sliding layers and full-attention layers
without RoPE, tied embeddings) with Mixtral-style experts, as
transformers' Cohere2MoeConfig and its model read it:

- the norms are float32 LayerNorms without bias of ``layer_norm_eps``
  (1e-5), or, when ``rms_norm_eps`` is set, Llama-style RMSNorms of it;
- ``head_dim`` as written, 128 when absent; RoPE base 10000 by default;
- ``mlp_layer_types`` marks each layer ``dense`` or ``sparse``; without it
  the first ``first_k_dense_replace`` (0) layers are dense. Dense layers
  have a SwiGLU MLP of ``prefix_dense_intermediate_size`` (default
  ``intermediate_size``);
- ``layer_types``: without it the dense prefix layers are full attention
  every ``prefix_dense_sliding_window_pattern``-th layer (1: all), the rest
  every ``sliding_window_pattern``-th (4); the others slide over
  ``sliding_window`` (4096) tokens. Full-attention layers apply no RoPE,
  except the dense ones while ``prefix_dense_sliding_window_pattern`` is 1;
- sparse layers: ``num_experts`` (8) experts of ``intermediate_size``,
  ``num_experts_per_tok`` (2) chosen by the top router logits, weighted by
  their softmax (``expert_selection_fn`` softmax) or sigmoid (``sigmoid``,
  divided by their sum with ``norm_topk_prob``, on by default);
  ``num_shared_experts`` (0) ungated shared experts of
  ``intermediate_size * num_shared_experts``, whose output is averaged
  with the routed experts' (``shared_expert_combination_strategy``
  average, the default) or added to it (sum).

Refused: other selection functions or combination strategies, activations
other than SiLU, ``partial_rotary_factor`` other than 1, ``rope_parameters``
nested by layer type, a null ``sliding_window`` with sliding layers, fp8
checkpoints (q/k rows are reordered at load) and tensor parallelism
(untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, cohere, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.exaone_moe import mlp_layer_types
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

DEFAULT_ROPE_THETA = 10000.0
DEFAULT_HEAD_DIM = 128
DEFAULT_WINDOW = 4096
SELECTIONS = ("softmax", "sigmoid")
COMBINATIONS = ("average", "sum")


def _positive(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _first_dense(cfg: dict[str, Any]) -> int:
    return int(cfg.get("first_k_dense_replace") or 0)


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's attention, as Cohere2MoeConfig derives it."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        first = min(_first_dense(cfg), n)
        prefix = _positive(cfg, "prefix_dense_sliding_window_pattern", 1)
        rest = _positive(cfg, "sliding_window_pattern", 4)
        types = ["sliding_attention" if (i + 1) % prefix else "full_attention" for i in range(first)]
        types += ["sliding_attention" if (i + 1) % rest else "full_attention" for i in range(n - first)]
    types = checked_layer_types(types, n, "cohere2_moe")
    if cfg.get("sliding_window", DEFAULT_WINDOW) is None and "sliding_attention" in types:
        # transformers' sliding layers would then neither slide nor rotate
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def _mlp_types(cfg: dict[str, Any]) -> list[str]:
    return mlp_layer_types({**cfg, "first_k_dense_replace": _first_dense(cfg)}, "cohere2_moe", first_dense=0)


def _choice(cfg: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key) or default
    if value not in allowed:
        raise ValueError(f"{key} {value!r} is not supported for cohere2_moe; supported: {', '.join(allowed)}")
    return value


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = cohere.llama_keys(cfg)
    if cfg.get("rms_norm_eps") is not None:
        out["rms_norm_eps"] = float(cfg["rms_norm_eps"])
    out["head_dim"] = int(cfg.get("head_dim") or DEFAULT_HEAD_DIM)
    if cfg.get("rope_theta") is None and cohere.rope_dict(cfg).get("rope_theta") is None:
        out["rope_theta"] = DEFAULT_ROPE_THETA
    experts = int(cfg.get("intermediate_size", 22528))  # Cohere2MoeConfig's default
    sigmoid = _choice(cfg, "expert_selection_fn", "softmax", SELECTIONS) == "sigmoid"
    average = _choice(cfg, "shared_expert_combination_strategy", "average", COMBINATIONS) == "average"
    out.update(
        intermediate_size=int(cfg.get("prefix_dense_intermediate_size") or experts),
        num_experts=int(cfg.get("num_experts", 8)),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
        moe_intermediate_size=experts,
        # the softmax over the top-k logits sums to one: renormalised
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) or not sigmoid,
        mlp_only_layers=[i for i, t in enumerate(_mlp_types(cfg)) if t == "dense"],
        shared_expert_intermediate_size=experts * int(cfg.get("num_shared_experts") or 0),
        moe_routing={"topk_sigmoid": sigmoid, "shared_expert_average": average},
        use_sliding_window=True, sliding_window=cfg.get("sliding_window", DEFAULT_WINDOW),
        layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Cohere2MoeForCausalLM", "q/k rows are reordered at load")
    rope = cohere.rope_dict(cfg)
    if {"full_attention", "sliding_attention"} & rope.keys():
        raise ValueError("rope_parameters nested by layer type are not supported for cohere2_moe "
                         "(one RoPE for the rotating layers)")
    refuse_partial_rotary(cfg, rope, "cohere2_moe")
    # transformers' Cohere2MoeAttention: sliding layers rotate, and the dense ones while
    # prefix_dense_sliding_window_pattern is 1 (its force_rope)
    forced = _positive(cfg, "prefix_dense_sliding_window_pattern", 1) == 1
    dense = _mlp_types(cfg)
    nope = tuple(i for i, t in enumerate(layer_types(cfg))
                 if t == "full_attention" and not (forced and dense[i] == "dense"))
    return FamilyOptions(hidden_act=checked_activation(cfg, "cohere2_moe"),
                         float_layer_norm="" if cfg.get("rms_norm_eps") is not None else "cohere",
                         parallel_residual=True, interleaved_rope=True, logit_scale=cohere.logit_scale(cfg),
                         nope_layers=nope,
                         tensor_parallel_refusal="its top-k routed experts beside averaged shared experts "
                                                 "(Cohere 2 MoE) are untested across ranks")


DIALECT = Dialect(architectures=("Cohere2MoeForCausalLM",), llama_keys=llama_keys, options=options)
