"""Kolibri (``Kolibri1ForCausalLM``): its config.json in Llama's keys, and
its ``FamilyOptions``.

As transformers' Kolibri1Config and its model read it:

- EXAONE 4's attention: per-head q/k RMSNorms before RoPE; ``layer_types``
  (default: every fifth layer ``full_attention``, the rest
  ``sliding_attention``), the sliding layers over ``sliding_window`` (513)
  tokens; while a window is set the full-attention layers apply no RoPE
  (``FamilyOptions.nope_layers``); no biases anywhere;
- GLM-4's sandwich layers: a norm before and after attention and before
  and after the experts (``splitserve.engine.models.kolibri1``);
- experts in every layer: ``num_experts`` (384; ``num_local_experts`` its
  other name) of ``moe_intermediate_size`` (512), the ``num_experts_per_tok``
  (6) best by router logit plus the checkpoint's correction bias, each
  weighted by the sigmoid of its logit (divided by their sum with
  ``norm_topk_prob``, default off), all in float32; an ungated shared SwiGLU
  MLP of ``shared_expert_intermediate_size`` (512);
- defaults: 48 heads of 128 dims, 4 KV heads, eps 1e-6, untied embeddings,
  RoPE base 10000, ``max_position_embeddings`` 262144.

Refused: a null ``sliding_window`` beside sliding layers (transformers
refuses it too), activations other than SiLU, ``partial_rotary_factor``,
fp8 checkpoints (untested: the float32 router beside fp8 experts; tensors
renamed at load), tensor parallelism (untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary, required)
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

ARCH = "Kolibri1ForCausalLM"
# keys read as Llama's, with transformers' Kolibri1Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 128000, "hidden_size": 2560, "num_hidden_layers": 50, "num_attention_heads": 48,
           "num_key_value_heads": 4, "head_dim": 128, "rope_theta": None, "rope_parameters": None,
           "rope_scaling": None, "torch_dtype": None, "dtype": None, "bos_token_id": None,
           "eos_token_id": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "max_position_embeddings": 262144}
_MOE_DEFAULTS = {"num_experts_per_tok": 6, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}
DEFAULT_WINDOW = 513


def window(cfg: dict[str, Any]) -> int | None:
    """``sliding_window``: 513 when absent, None when null."""
    value = cfg.get("sliding_window", DEFAULT_WINDOW)
    if value is not None and int(value) <= 0:
        raise ValueError(f"sliding_window must be positive or null, got {value}")
    return value


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or Kolibri1Config's default (every fifth layer full)."""
    n = int(cfg.get("num_hidden_layers", _PASSED["num_hidden_layers"]))
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                                       for i in range(n)]
    types = checked_layer_types(types, n, "kolibri1")
    if window(cfg) is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    merged = {**_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 384)
    shared = int(required(merged, "shared_expert_intermediate_size"))
    out = passed_keys(cfg, _PASSED)
    out.update(attention_bias=False, mlp_bias=False, qk_norm=True, use_sliding_window=window(cfg) is not None,
               sliding_window=window(cfg), layer_types=layer_types(cfg),
               num_experts=experts, num_experts_per_tok=int(merged["num_experts_per_tok"]),
               moe_intermediate_size=int(merged["moe_intermediate_size"]),
               norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
               shared_expert_intermediate_size=shared,
               intermediate_size=shared)  # no dense MLP: every layer has the experts
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the float32 router beside fp8 experts, tensors "
                          "renamed at load")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, ARCH)
    types = layer_types(cfg)
    # transformers rotates a layer when sliding_window is None or the layer slides
    nope = () if window(cfg) is None else tuple(i for i, t in enumerate(types) if t == "full_attention")
    return FamilyOptions(hidden_act=checked_activation(cfg, "kolibri1"), nope_layers=nope,
                         tensor_parallel_refusal="its logit-ranked sigmoid router beside per-head q/k "
                                                 "norms and sandwich norms (Kolibri) is untested "
                                                 "across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
