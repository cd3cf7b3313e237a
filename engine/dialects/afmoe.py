"""AFMoE (Arcee Trinity: ``AfmoeForCausalLM``): its config.json in Llama's
keys, and its ``FamilyOptions``, as transformers' AfmoeConfig and its model
read them (``splitserve.engine.models.afmoe``):

- ``layer_types`` (else every ``global_attn_every_n_layers``-th layer full,
  default 4): the sliding layers attend to the last ``sliding_window`` (1024;
  null: all) tokens and apply RoPE, the full-attention layers apply none
  (``FamilyOptions.nope_layers``);
- per-head q/k RMSNorms before RoPE; the attention output gated by
  ``sigmoid(gate_proj(x))`` before ``o_proj``; four RMSNorms a layer (Gemma 2's
  sandwich, ``FamilyOptions.sandwich_norms``); ``attention_bias`` on q/k/v/o;
- ``num_experts`` (64) experts of ``moe_intermediate_size`` (1408),
  ``num_experts_per_tok`` (6), chosen by sigmoid scores plus ``expert_bias``,
  weighted by their unbiased scores renormalised and times ``route_scale``
  (1.0): GLM-4.5's grouped sigmoid router as one group; one ungated shared
  MLP of ``moe_intermediate_size * num_shared_experts`` (2); the first
  ``num_dense_layers`` (1) layers a dense SwiGLU MLP of ``intermediate_size``;
- ``mup_enabled``: embeddings multiplied by sqrt(hidden_size);
- RMSNorms multiplying their weight into the float32 normed row and rounding
  once (``FamilyOptions.norm_fp32_product``, as AfmoeRMSNorm);
- defaults: ``head_dim`` 128, eps 1e-5, untied embeddings, 16384 positions.

Refused: activations other than SiLU, a ``partial_rotary_factor`` other than
1, fp8 checkpoints (untested: the float32 router beside fp8 experts), tensor
parallelism (its attention gate is not split across ranks).
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

# Llama's keys, as written, else transformers' AfmoeConfig default (None: left out when absent)
_PASSED = {"vocab_size": 200192, "hidden_size": 2048, "intermediate_size": 6144,
           "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": None,
           "head_dim": 128, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None,
           "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "attention_bias": False, "bos_token_id": None, "eos_token_id": None}
# AfmoeConfig's mixture-of-experts defaults
_MOE = {"num_experts": 64, "num_experts_per_tok": 6, "moe_intermediate_size": 1408,
        "num_shared_experts": 2, "route_scale": 1.0, "num_dense_layers": 1}
DEFAULT_WINDOW = 1024


def _get(cfg: dict[str, Any], key: str, default: Any) -> Any:
    return default if cfg.get(key) is None else cfg[key]


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as AfmoeConfig derives it from ``global_attn_every_n_layers``."""
    n = int(_get(cfg, "num_hidden_layers", _PASSED["num_hidden_layers"]))
    types = cfg.get("layer_types")
    if types is None:
        every = int(_get(cfg, "global_attn_every_n_layers", 4))
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    return checked_layer_types(types, n, "afmoe")


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    moe = {k: _get(cfg, k, d) for k, d in _MOE.items()}
    routed = moe_keys({"n_routed_experts": moe["num_experts"],
                       "num_experts_per_tok": moe["num_experts_per_tok"],
                       "moe_intermediate_size": moe["moe_intermediate_size"],
                       "n_shared_experts": moe["num_shared_experts"],
                       "routed_scaling_factor": moe["route_scale"],
                       "first_k_dense_replace": moe["num_dense_layers"]},
                      "afmoe", first_dense=1, norm_topk=True)
    out = passed_keys(cfg, _PASSED)
    out.setdefault("num_key_value_heads", out["num_attention_heads"])
    window = cfg.get("sliding_window", DEFAULT_WINDOW)
    out.update(routed, attention_out_bias=out["attention_bias"], mlp_bias=False, qk_norm=True,
               use_sliding_window=window is not None, sliding_window=window,
               layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "AfmoeForCausalLM", "untested: the float32 router and its "
                          "expert_bias beside fp8 experts")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or {}, "afmoe")
    hidden = int(_get(cfg, "hidden_size", _PASSED["hidden_size"]))
    full = tuple(i for i, t in enumerate(layer_types(cfg)) if t == "full_attention")
    return FamilyOptions(
        hidden_act=checked_activation(cfg, "afmoe"), sandwich_norms=True, nope_layers=full,
        norm_fp32_product=True,  # AfmoeRMSNorm: weight times the float32 normed row, rounded once
        embed_scale=math.sqrt(hidden) if cfg.get("mup_enabled") else 1.0,
        tensor_parallel_refusal="its gated attention and sigmoid router (AFMoE) are not split "
                                "across ranks (serve it at tensor_parallel_size 1)")


DIALECT = Dialect(architectures=("AfmoeForCausalLM",), llama_keys=llama_keys, options=options)
