"""PhiMoE (Phi-3.5-MoE, ``PhimoeForCausalLM``): its config.json in Llama's
keys, with transformers' PhimoeConfig defaults, and its ``FamilyOptions``.

- LayerNorm with a bias (eps: ``rms_norm_eps``, default 1e-5) before
  attention, before the experts and at the end (``FamilyOptions.layer_norm``);
- ``attention_bias`` covers q/k/v and o_proj; ``lm_head_bias``: the
  vocabulary projection has one;
- ``intermediate_size`` is each expert's; ``num_local_experts`` (default
  16) SwiGLU experts stored as Mixtral's (``block_sparse_moe.experts.3.w1``),
  routed by sparsemixer (``MoEConfig.sparsemixer_eps``: its
  ``router_jitter_noise``, default 0.01), which always picks two experts:
  a ``num_experts_per_tok`` other than 2 is refused;
- ``sliding_window``: a window on every layer when set;
- RoPE base 1e6 by default; "longrope" scaling as transformers' PhiMoE
  computes it: the short factors at every position, cos/sin scaled by
  ``short_mscale`` up to ``original_max_position_embeddings`` and by
  ``long_mscale`` from there on (``splitserve.engine.models.phimoe``).
  Other scaling types and ``partial_rotary_factor`` are refused;
- 8 KV heads, 131072 positions, untied embeddings, bos 1, eos 2 by default.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' PhimoeConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "head_dim": None, "rope_parameters": None, "rope_scaling": None,
           "original_max_position_embeddings": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_THETA = 1_000_000.0  # PhimoeConfig.default_theta


def rope_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's rope dict ({} when none), checked: default or longrope
    with both mscales, every dim rotating."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "longrope", "su"):
        raise ValueError(f"rope scaling {kind!r} is not supported for phimoe; supported: default, longrope")
    for key in ("short_mscale", "long_mscale"):
        if kind != "default" and not isinstance(rope.get(key), (int, float)):
            raise ValueError(f"PhiMoE's longrope rope scaling needs {key} as a number; got {rope.get(key)!r}")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported for phimoe (every dim rotates)")
    return rope


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    rope_dict(cfg)
    top_k = int(cfg.get("num_experts_per_tok") or 2)
    if top_k != 2:
        raise ValueError(f"num_experts_per_tok {top_k} is not supported for phimoe: its sparsemixer "
                         "router always picks 2 experts")
    kv_heads = cfg.get("num_key_value_heads", 8)
    jitter = cfg.get("router_jitter_noise")
    window = cfg.get("sliding_window")
    out = {**passed_keys(cfg, _PASSED),
           "num_key_value_heads": int(kv_heads) if kv_heads is not None else int(cfg["num_attention_heads"]),
           "rope_theta": float(cfg.get("rope_theta") or DEFAULT_THETA),
           "attention_out_bias": bool(cfg.get("attention_bias", False)), "mlp_bias": False,
           "num_experts": int(cfg.get("num_local_experts") or 16), "num_experts_per_tok": 2,
           "moe_intermediate_size": int(cfg["intermediate_size"]), "norm_topk_prob": False,
           "moe_routing": {"sparsemixer_eps": 0.01 if jitter is None else float(jitter)}}
    if window is not None:  # every layer, as transformers' sliding-window mask applies it
        out.update(sliding_window=window, use_sliding_window=True,
                   layer_types=["sliding_attention"] * int(cfg["num_hidden_layers"]))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=checked_activation(cfg, "phimoe"), layer_norm=True,
                         lm_head_bias=bool(cfg.get("lm_head_bias", False)))


DIALECT = Dialect(architectures=("PhimoeForCausalLM",), llama_keys=llama_keys, options=options)
