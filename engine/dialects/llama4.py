"""Llama 4 (``Llama4ForCausalLM``, model_type llama4_text; and the text tower of
``Llama4ForConditionalGeneration``, model_type llama4, from its ``text_config``):
config.json in Llama's keys and its ``FamilyOptions``, as transformers'
``Llama4TextConfig`` and its model read them.

- ``no_rope_layers`` (one flag per layer, 0: no RoPE; when absent or empty every
  ``no_rope_layer_interval``-th layer, default 4, has none): ``FamilyOptions.nope_layers``;
  on those layers, with ``attn_temperature_tuning`` (on), queries scaled by position
  (``floor_scale`` 8192, ``attn_scale`` 0.1: ``FamilyOptions.temperature_floor`` /
  ``temperature_scale``); on the others, with ``use_qk_norm`` (on), q and k
  L2-normed per head once rotated (``FamilyOptions.rope_qk_l2_norm``);
- RoPE on adjacent dim pairs (the complex form), base 500000, scaling none,
  ``linear`` or ``llama3``;
- ``attention_chunk_size`` (8192; null: none): the layers ``layer_types`` marks
  ``chunked_attention`` (by default those with RoPE) attend only within their chunk
  of positions. The engine serves at most that many tokens of context
  (``max_position_embeddings`` capped at it), where every token sits in the first
  chunk and chunked attention is plain causal attention;
- the experts (``num_local_experts`` 16, ``num_experts_per_tok`` 1, each of
  ``intermediate_size`` 8192, and an ungated shared expert as wide) in the layers
  ``moe_layers`` lists (by default every ``interleave_moe_layer_step``-th, 1), a dense
  SwiGLU MLP of ``intermediate_size_mlp`` (16384) in the others;
- ``attention_bias`` covers q/k/v and o_proj; no MLP biases; eps 1e-5, untied
  embeddings, 8 KV heads, head_dim 128.
Refused: activations other than SiLU, other RoPE scalings, a ``layer_types`` entry
other than chunked/full attention, fp8 checkpoints (untested here; ``weight_dtype:
fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary, wrapped_text_config)
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, smollm3_rope_layers

WRAPPED = "Llama4ForConditionalGeneration"  # its text model's tensors under language_model.
# keys read as Llama's, with Llama4TextConfig's defaults (None: left out when absent)
_PASSED = {"vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
           "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": None, "rope_scaling": None,
           "attention_bias": False}
DEFAULT_THETA = 500000.0
DEFAULT_MAX_POSITION = 131072
DEFAULT_CHUNK = 8192
_ROPE_TYPES = ("default", "linear", "llama3")


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: ``text_config`` for ``Llama4ForConditionalGeneration``
    (its dtype and quantization_config from the top level where it has none), else
    config.json itself."""
    text = wrapped_text_config(cfg, DIALECT.architectures, WRAPPED)
    return cfg if text is None else text


def _positive(cfg: dict[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    if value is not None and not float(value) > 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return value


def chunked_layers(cfg: dict[str, Any]) -> list[bool]:
    """Per layer, whether it attends within chunks (``layer_types``, or as
    Llama4TextConfig derives them: the RoPE layers, while a chunk size is set)."""
    n, chunk = int(cfg.get("num_hidden_layers", 48)), _positive(cfg, "attention_chunk_size", DEFAULT_CHUNK)
    types = cfg.get("layer_types")
    if types is None:
        return [bool(rope) and chunk is not None for rope in rope_layers(cfg)]
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
    unknown = set(types) - {"chunked_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported for llama4; supported: "
                         "chunked_attention, full_attention")
    if chunk is None and "chunked_attention" in types:
        raise ValueError("attention_chunk_size is null but layer_types has chunked_attention layers")
    return [t == "chunked_attention" for t in types]


def rope_layers(cfg: dict[str, Any]) -> list[int]:
    """``no_rope_layers`` per layer (1: RoPE, 0: none), an empty list read as absent."""
    return smollm3_rope_layers({"num_hidden_layers": 48, **cfg,
                                "no_rope_layers": cfg.get("no_rope_layers") or None})


def _rope(cfg: dict[str, Any], max_position: int) -> dict[str, Any]:
    """The RoPE keys: the base (500000 by default), scaling of a supported kind, and
    llama3's pretraining length where only the uncapped max_position_embeddings gives it."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope scaling {kind!r} is not supported for llama4; supported: "
                         f"{', '.join(_ROPE_TYPES)}")
    refuse_partial_rotary(cfg, rope, "llama4")
    out = {"rope_theta": cfg.get("rope_theta") or DEFAULT_THETA}
    if cfg.get("original_max_position_embeddings") is not None:  # wins over the dict's, as there
        out["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    elif kind == "llama3" and rope.get("original_max_position_embeddings") is None:
        out["original_max_position_embeddings"] = max_position
    return out


def _moe_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The experts in the Qwen keys: the layers not in ``moe_layers`` dense."""
    n, experts = int(cfg.get("num_hidden_layers", 48)), int(cfg.get("intermediate_size") or 8192)
    sparse = cfg.get("moe_layers")
    if sparse is None:
        step = int(cfg.get("interleave_moe_layer_step", 1))
        if step <= 0:
            raise ValueError(f"interleave_moe_layer_step must be positive, got {step}")
        sparse = range(step - 1, n, step)
    sparse = set(sparse)
    return {"num_experts": int(cfg.get("num_local_experts") or 16),
            "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 1),
            "moe_intermediate_size": experts, "shared_expert_intermediate_size": experts,
            "mlp_only_layers": [i for i in range(n) if i not in sparse], "norm_topk_prob": False}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    text = text_config(cfg)
    max_position = int(text.get("max_position_embeddings") or DEFAULT_MAX_POSITION)
    context = max_position
    if any(chunked_layers(text)):  # served only where chunked attention is causal attention
        context = min(max_position, int(text.get("attention_chunk_size", DEFAULT_CHUNK)))
    out = passed_keys(text, {**_PASSED, "torch_dtype": None, "dtype": None, "quantization_config": None})
    return {**out, **_rope(text, max_position), **_moe_keys(text), "max_position_embeddings": context,
            "intermediate_size": int(text.get("intermediate_size_mlp") or 16384),
            "attention_out_bias": bool(text.get("attention_bias", False)), "mlp_bias": False, "qk_norm": False}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    text = text_config(cfg)
    refuse_fp8_checkpoint(text, "Llama 4", "untested: its fused experts are split and its q/k rows "
                          "reordered at load")
    tuning = bool(text.get("attn_temperature_tuning", True))
    floor = float(_positive(text, "floor_scale", 8192) or 8192)
    return FamilyOptions(hidden_act=checked_activation(text, "llama4"),
                         nope_layers=tuple(i for i, rope in enumerate(rope_layers(text)) if not rope),
                         interleaved_rope=True, rope_qk_l2_norm=bool(text.get("use_qk_norm", True)),
                         temperature_floor=floor if tuning else 0.0,
                         temperature_scale=float(text.get("attn_scale", 0.1)) if tuning else 0.0)


DIALECT = Dialect(architectures=("Llama4ForCausalLM", WRAPPED), llama_keys=llama_keys, options=options)
