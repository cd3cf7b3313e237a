"""gpt-oss (``GptOssForCausalLM``): its config.json in Llama's keys, and its
``FamilyOptions``, as transformers' ``GptOssConfig`` and its model read them.

- attention sinks: a learned logit per query head (``self_attn.sinks``)
  joins each softmax's denominator (``FamilyOptions.attention_sinks``);
- ``layer_types`` marks each layer ``sliding_attention`` (a window of
  ``sliding_window`` tokens, default 128) or ``full_attention``; without it
  layers alternate, sliding first;
- ``attention_bias`` (on by default) covers q/k/v and o_proj;
- RoPE base 150000 by default, rotate-half pairs; without
  ``rope_parameters`` / ``rope_scaling`` transformers' default YaRN
  (factor 32 over 4096 positions, beta 32 / 1, ``truncate`` off);
- every layer's MLP is ``num_local_experts`` (default 128) experts of
  ``intermediate_size``, ``num_experts_per_tok`` (default 4) per token,
  routed and activated as ``splitserve.engine.models.gpt_oss`` says
  (``swiglu_alpha`` 1.702, ``swiglu_limit`` 7.0 by default);
- RMSNorm (eps 1e-5) multiplies its weight into the float32 normed row and
  rounds once; untied embeddings.

``hidden_act`` is written in its config.json but transformers' experts
never read it: neither does this. MXFP4 checkpoints (the released gpt-oss
weights: ``quantization_config`` quant_method ``mxfp4``, the experts in
MXFP4) load with their experts dequantized to the model dtype
(``splitserve.engine.models.mxfp4``); fp8 checkpoints are refused.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

# keys read as Llama's, with transformers' GptOssConfig defaults
_PASSED = {"vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
           "num_attention_heads": 64, "head_dim": 64, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": None,
           "dtype": None, "bos_token_id": None, "eos_token_id": None, "rope_theta": None,
           "original_max_position_embeddings": None}
DEFAULT_ROPE_THETA = 150000.0
# GptOssConfig's rope_parameters when config.json gives none
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULT_WINDOW = 128
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def window(cfg: dict[str, Any]) -> int | None:
    """``sliding_window``: 128 when absent, None when null."""
    return cfg.get("sliding_window", DEFAULT_WINDOW)


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as GptOssConfig fills them: even layers slide, odd ones do not."""
    n = int(cfg.get("num_hidden_layers") or _PASSED["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    types = checked_layer_types(types, n, "gpt_oss")
    if window(cfg) is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def _swiglu(cfg: dict[str, Any], key: str, default: float) -> float:
    value = cfg.get(key)
    value = default if value is None else float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{key} must be a positive number, got {cfg.get(key)!r}")
    return value


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    heads = int(out["num_attention_heads"])
    kv = cfg.get("num_key_value_heads", 8)  # null: one per query head
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or DEFAULT_ROPE
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 128)
    bias = bool(cfg.get("attention_bias", True))
    out.update(
        num_key_value_heads=heads if kv is None else int(kv),
        rope_theta=rope.get("rope_theta") or cfg.get("rope_theta") or DEFAULT_ROPE_THETA,
        rope_parameters=dict(rope), attention_bias=bias, attention_out_bias=bias, mlp_bias=False,
        use_sliding_window=window(cfg) is not None, sliding_window=window(cfg), layer_types=layer_types(cfg),
        num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 4),
        moe_intermediate_size=int(out["intermediate_size"]),
        norm_topk_prob=True,  # a softmax over the top k logits: the top k renormalised
        moe_routing={"swiglu_alpha": _swiglu(cfg, "swiglu_alpha", SWIGLU_ALPHA),
                     "swiglu_limit": _swiglu(cfg, "swiglu_limit", SWIGLU_LIMIT)},
    )
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    quant = cfg.get("quantization_config")
    if not (isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"):  # dequantized at load
        refuse_fp8_checkpoint(cfg, "GptOssForCausalLM", "its fused experts are split and "
                              "de-interleaved at load")
    return FamilyOptions(norm_fp32_product=True, attention_sinks=True)


DIALECT = Dialect(architectures=("GptOssForCausalLM",), llama_keys=llama_keys, options=options)
