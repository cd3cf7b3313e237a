"""Granite SWA (``GraniteSWAForCausalLM``): its config.json in Llama's keys,
and its ``FamilyOptions``, as transformers' ``GraniteSWAConfig`` and its
model read them.

Granite's decoder (``embedding_multiplier``, ``attention_multiplier`` as
the score scale, ``residual_multiplier``, ``logits_scaling``; biases per
``attention_bias`` on q/k/v and o_proj and per ``mlp_bias``) with:

- ``layer_types``: each layer ``sliding_attention`` (a window of
  ``sliding_window`` tokens, default 128) or ``full_attention``; without
  it every fourth layer from layer 0 is full, the others slide;
- attention sinks: a learned logit per query head (``self_attn.sinks``)
  joins each softmax's denominator (transformers scales each head's output
  by sigmoid(logsumexp(scores) - sink), the same thing;
  ``FamilyOptions.attention_sinks``);
- ``layer_rope_theta``: each layer's RoPE base, 0 for a layer without RoPE;
  the model's ``rope_parameters`` (scaling included) with that base
  otherwise (``FamilyOptions.layer_rope_thetas``). Without it every layer
  rotates with ``rope_parameters``' base.

GraniteSWAConfig's defaults fill what config.json leaves out (eps 1e-5,
tied embeddings, 4 KV heads...). GraniteMoeSWA
(``splitserve.engine.dialects.granitemoe_swa``) reads the same keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, parse_family_options

# keys read as Llama's, with transformers' GraniteSWAConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 100352, "hidden_size": 2560, "intermediate_size": 8192, "num_hidden_layers": 24,
           "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": None,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "bos_token_id": 100257,
           "eos_token_id": 100257, "tie_word_embeddings": True, "attention_bias": False,
           "mlp_bias": False, "hidden_act": None, "rope_parameters": None, "rope_scaling": None,
           "rope_theta": None, "partial_rotary_factor": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "embedding_multiplier": None, "attention_multiplier": None,
           "residual_multiplier": None, "logits_scaling": None}
DEFAULT_WINDOW = 128


def layer_types(cfg: dict[str, Any], num_layers: int, family: str) -> list[str]:
    """``layer_types``, or as GraniteSWAConfig fills them: layers 0, 4, 8...
    full attention, the others sliding; a sliding layer needs a window."""
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(num_layers)]
    types = checked_layer_types(types, num_layers, family)
    if cfg.get("sliding_window", DEFAULT_WINDOW) is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def window_keys(cfg: dict[str, Any], num_layers: int, family: str) -> dict[str, Any]:
    """The Llama-style window keys of ``layer_types`` and ``sliding_window``."""
    window = cfg.get("sliding_window", DEFAULT_WINDOW)
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "layer_types": layer_types(cfg, num_layers, family)}


def layer_rope_thetas(cfg: dict[str, Any], num_layers: int) -> tuple[float, ...]:
    """``layer_rope_theta`` (one base per layer, 0: no RoPE); () when absent."""
    thetas = cfg.get("layer_rope_theta")
    if thetas is None:
        return ()
    if not isinstance(thetas, list) or len(thetas) < num_layers:  # transformers indexes it by layer
        raise ValueError(f"layer_rope_theta must list one RoPE base per layer ({num_layers}), "
                         f"got {thetas!r}")
    out = tuple(float(t) for t in thetas[:num_layers])
    if any(not t >= 0 or t == float("inf") for t in out):
        raise ValueError(f"layer_rope_theta must hold non-negative numbers (0: no RoPE), got {thetas!r}")
    return out


def swa_options(granite: FamilyOptions, cfg: dict[str, Any], num_layers: int) -> FamilyOptions:
    """``granite`` (Granite's multipliers and activation) with sinks and the per-layer RoPE bases."""
    return dataclasses.replace(granite, attention_sinks=True,
                               layer_rope_thetas=layer_rope_thetas(cfg, num_layers))


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    return {**out, **window_keys(cfg, int(out["num_hidden_layers"]), "granite_swa")}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    full = passed_keys(cfg, _PASSED)
    granite = parse_family_options(full, "granite")
    return swa_options(granite, cfg, int(full["num_hidden_layers"]))


DIALECT = Dialect(architectures=("GraniteSWAForCausalLM",), llama_keys=llama_keys, options=options)
