"""Gemma 4 text (``Gemma4ForCausalLM``, model_type gemma4_text; and the text tower
of ``Gemma4ForConditionalGeneration``, model_type gemma4, from its ``text_config``):
config.json in Llama's keys, its ``FamilyOptions`` and per-layer shape
(``Gemma4Shape``), as transformers' ``Gemma4TextConfig`` reads them.

- ``layer_types`` (by default five sliding layers then one full, the last layer
  always full): the sliding ones attend within ``sliding_window`` (512);
- the full-attention layers have heads of ``global_head_dim`` (512) and, with
  ``attention_k_eq_v``, ``num_global_key_value_heads`` KV heads whose values are
  k_proj's output (no v_proj); a ``per_layer_config`` (what transformers >= 5.25
  writes in their place) gives ``head_dim`` / ``num_key_value_heads`` per layer;
- RoPE per layer type (``rope_parameters``): ``default`` or ``proportional``
  (only the first ``partial_rotary_factor`` of each half's pairs turn, their
  frequencies over the whole head; ``factor`` divides them), by default 10000 on
  the sliding layers and proportional 1e6 with factor 0.25 on the full ones;
- the last ``num_kv_shared_layers`` layers reuse the keys and values of the last
  earlier layer of their type (``use_double_wide_mlp``: their MLP twice as wide);
- per-layer input embeddings of ``hidden_size_per_layer_input`` (256; 0: none)
  over ``vocab_size_per_layer_input`` tokens;
- with ``enable_moe_block``, ``num_experts`` experts of ``moe_intermediate_size``
  (``top_k_experts`` per token) beside every layer's MLP;
- scores unscaled (scale 1), q/k RMSNorms per head and a weightless one on v,
  norms scaling by their weight (not 1 + weight), embeddings scaled by
  sqrt(hidden_size), a GeGLU MLP between sandwich norms, ``final_logit_softcapping``
  (null: none), tied embeddings.

The engine's paged cache has one head count and width for every layer: the
largest head width and the least common multiple of the layers' KV head counts
(``head_dim`` / ``num_key_value_heads`` here); each layer zero-pads its heads and
repeats its KV heads to fill it (``splitserve.engine.models.gemma4``).

Refused: ``use_bidirectional_attention`` "all" ("vision" makes only image tokens
bidirectional: text attends causally), RoPE types other than default / proportional,
``per_layer_config`` entries other than head_dim / num_key_value_heads, layers of
one type with different head widths, fp8 checkpoints (q/k/v fused and values
shared at load, untested), tensor parallelism.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        wrapped_text_config)
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, family_activation
from splitserve.engine.gemma4_config import Gemma4Shape, LayerRope

WRAPPED = "Gemma4ForConditionalGeneration"  # its text model's tensors under model.language_model.
# keys read as Llama's, with Gemma4TextConfig's defaults (None: left out when absent)
_PASSED = {"vocab_size": 262_144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
           "num_attention_heads": 8, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "sliding_window": 512,
           "torch_dtype": None, "dtype": None, "quantization_config": None}
_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                    "rope_theta": 1_000_000.0}}
_LAYER_KEYS = ("head_dim", "num_key_value_heads")  # what a per_layer_config entry may set


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: ``text_config`` for ``Gemma4ForConditionalGeneration``
    (its dtype and quantization_config from the top level where it has none), else
    config.json itself."""
    text = wrapped_text_config(cfg, DIALECT.architectures, WRAPPED, ("tie_word_embeddings",))
    return cfg if text is None else text


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as Gemma4TextConfig derives them; the last layer full."""
    n = int(cfg.get("num_hidden_layers", _PASSED["num_hidden_layers"]))
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    types = checked_layer_types(list(types), n, "gemma4")
    if types:
        types[-1] = "full_attention"  # transformers forces it so
    return types


def _layer_overrides(cfg: dict[str, Any], types: list[str]) -> dict[int, dict[str, Any]]:
    """Layer -> its head_dim / num_key_value_heads, from ``per_layer_config`` or, as
    Gemma4TextConfig derives it, ``global_head_dim`` (and, with attention_k_eq_v,
    ``num_global_key_value_heads``) on the full-attention layers."""
    written = cfg.get("per_layer_config")
    if written is not None:
        out = {}
        for key, entry in written.items():
            extra = set(entry) - set(_LAYER_KEYS)
            if extra:
                raise ValueError(f"per_layer_config sets {sorted(extra)} for layer {key}; only "
                                 f"{', '.join(_LAYER_KEYS)} are supported for gemma4")
            if not str(key).isdigit() or int(key) >= len(types):
                raise ValueError(f"per_layer_config has an entry for layer {key!r} of {len(types)}")
            out[int(key)] = dict(entry)
        return out
    full = {"head_dim": int(cfg.get("global_head_dim") or 512)}
    kv = cfg.get("num_global_key_value_heads")
    if kv is not None and cfg.get("attention_k_eq_v", False):
        full["num_key_value_heads"] = int(kv)
    return {i: full for i, t in enumerate(types) if t == "full_attention"}


def _rope(cfg: dict[str, Any], kind: str, head_dim: int) -> LayerRope:
    params = (cfg.get("rope_parameters") or _DEFAULT_ROPE).get(kind)
    if not params:
        raise ValueError(f"rope_parameters has no {kind} entry (transformers' Gemma 4 nests them by "
                         "layer type)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "proportional"):
        raise ValueError(f"rope type {rope_type!r} ({kind}) is not supported for gemma4; supported: "
                         "default, proportional")
    if params.get("rope_theta") is None:
        raise ValueError(f"rope_parameters[{kind!r}] has no rope_theta")
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head width; {kind} layers have {head_dim}")
    if rope_type == "default":
        return LayerRope(float(params["rope_theta"]), head_dim, head_dim // 2)
    angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    return LayerRope(float(params["rope_theta"]), head_dim, angles, float(params.get("factor", 1.0)))


def kv_sources(cfg: dict[str, Any], types: list[str]) -> list[int]:
    """Per layer, the layer whose keys and values it attends over (Gemma4TextConfig's
    ``kv_sharing_modes``: the last ``num_kv_shared_layers`` reuse the last earlier
    layer of their type)."""
    n, shared = len(types), int(cfg.get("num_kv_shared_layers") or 0)
    if not 0 <= shared < n:
        raise ValueError(f"num_kv_shared_layers must be in [0, {n}) for {n} layers, got {shared}")
    first = n - shared
    out = list(range(n))
    for i in range(first, n):
        producers = [j for j in range(first) if types[j] == types[i]]
        if not producers:
            raise ValueError(f"num_kv_shared_layers {shared}: no earlier {types[i]} layer for layer {i} "
                             "to share keys and values with")
        out[i] = producers[-1]
    return out


def shape(cfg: dict[str, Any]) -> Gemma4Shape:
    """Every layer's head width, KV heads, values, cache source, MLP width and RoPE."""
    types = layer_types(cfg)
    overrides = _layer_overrides(cfg, types)
    base_dim, base_kv = int(cfg.get("head_dim") or 256), int(cfg.get("num_key_value_heads") or 4)
    dims = [int(overrides.get(i, {}).get("head_dim", base_dim)) for i in range(len(types))]
    kv = [int(overrides.get(i, {}).get("num_key_value_heads", base_kv)) for i in range(len(types))]
    heads = int(cfg.get("num_attention_heads", _PASSED["num_attention_heads"]))
    for i, h in enumerate(kv):
        if h <= 0 or heads % h:
            raise ValueError(f"layer {i}: num_attention_heads ({heads}) must be a multiple of its "
                             f"{h} KV heads")
    ropes = {}
    for kind in sorted(set(types)):
        widths = {d for d, t in zip(dims, types) if t == kind}
        if len(widths) > 1:
            raise ValueError(f"{kind} layers of different head widths {sorted(widths)} are not supported "
                             "for gemma4 (one RoPE table per layer type)")
        ropes[kind] = _rope(cfg, kind, widths.pop())
    sources = kv_sources(cfg, types)
    for i, j in enumerate(sources):
        if (dims[i], kv[i]) != (dims[j], kv[j]):
            raise ValueError(f"layer {i} shares layer {j}'s keys and values but its heads differ")
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    inter = int(cfg.get("intermediate_size", _PASSED["intermediate_size"]))
    wide = bool(cfg.get("use_double_wide_mlp", False))
    ple = cfg.get("hidden_size_per_layer_input", 256)
    return Gemma4Shape(
        head_dims=tuple(dims), kv_heads=tuple(kv),
        k_eq_v=tuple(k_eq_v and t == "full_attention" for t in types),
        kv_source=tuple(sources),
        intermediate=tuple(inter * (2 if wide and s != i else 1) for i, s in enumerate(sources)),
        ropes=tuple(ropes[t] for t in types),
        ple_dim=int(ple or 0),
        ple_vocab=int(cfg.get("vocab_size_per_layer_input") or _PASSED["vocab_size"]),
        **experts(cfg))


def experts(cfg: dict[str, Any]) -> dict[str, int]:
    """With ``enable_moe_block``: ``num_experts``, ``top_k_experts`` and
    ``moe_intermediate_size`` (transformers has no defaults for them)."""
    if not cfg.get("enable_moe_block"):
        return {}
    keys = {"num_experts": "num_experts", "top_k": "top_k_experts", "moe_intermediate": "moe_intermediate_size"}
    out = {}
    for field, key in keys.items():
        value = cfg.get(key)
        if value is None or int(value) <= 0:
            raise ValueError(f"enable_moe_block needs a positive {key}, got {value!r}")
        out[field] = int(value)
    if out["top_k"] > out["num_experts"]:
        raise ValueError(f"top_k_experts ({out['top_k']}) exceeds num_experts ({out['num_experts']})")
    return out


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    if "sliding_attention" in layer_types(cfg) and "sliding_window" in cfg and cfg["sliding_window"] is None:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    mode = cfg.get("use_bidirectional_attention")
    if mode not in (None, "vision"):  # "vision": image tokens only, so text stays causal
        raise ValueError(f"use_bidirectional_attention {mode!r}: not a causal language model "
                         "(not supported for gemma4)")


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Llama-style keys; the cache's head shape covers every layer's."""
    text = text_config(cfg)
    s = shape(text)
    out = passed_keys(text, _PASSED)
    types = layer_types(text)
    return {**out, "head_dim": max(s.head_dims), "num_key_value_heads": math.lcm(*s.kv_heads),
            "layer_types": types, "use_sliding_window": True, "rope_theta": 10_000.0,
            "attention_bias": bool(text.get("attention_bias", False)), "mlp_bias": False, "qk_norm": False}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    text = text_config(cfg)
    _refuse_unsupported(text)
    refuse_fp8_checkpoint(text, "Gemma 4", "its q/k/v are fused and values shared at load, untested")
    hidden = int(text.get("hidden_size", _PASSED["hidden_size"]))
    cap = text.get("final_logit_softcapping")
    if cap is not None and float(cap) <= 0:
        raise ValueError(f"final_logit_softcapping must be positive or null, got {cap!r}")
    act = family_activation({"hidden_activation": text.get("hidden_activation") or "gelu_pytorch_tanh"},
                            "gemma3")
    return FamilyOptions(
        hidden_act=act, norm_fp32_product=True, embed_scale=math.sqrt(hidden), attn_scale=1.0,
        final_softcap=float(cap or 0.0), sandwich_norms=True,
        tensor_parallel_refusal="its layers of different head shapes (Gemma 4) are not split across "
                                "ranks (serve it at tensor_parallel_size 1)",
        gemma4=shape(text))


DIALECT = Dialect(architectures=("Gemma4ForCausalLM", WRAPPED), llama_keys=llama_keys, options=options)
