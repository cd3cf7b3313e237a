"""Cohere 2 (Command R7B, Command A: ``Cohere2ForCausalLM``): its config.json
in Llama's keys, and its ``FamilyOptions``.

Cohere's decoder (``splitserve.engine.dialects.cohere``: the parallel
residual on one float32 LayerNorm, interleaved RoPE pairs, ``logit_scale``,
q/k/v/o biases per ``attention_bias``, tied embeddings and the same token
ids by default) with, as transformers' Cohere2Config reads it:

- ``layer_types`` per layer; without it every ``sliding_window_pattern``-th
  layer (default 4) is full attention and the others slide;
- the sliding layers attend to ``sliding_window`` (default 4096) tokens and
  rotate q/k; the full-attention layers apply no RoPE at all
  (``FamilyOptions.nope_layers``, ``splitserve.engine.models.cohere2``);
- head_dim is always hidden_size / num_attention_heads (a ``head_dim`` key
  is overwritten), RoPE base 10000 by default, no q/k norms.

Refused: ``partial_rotary_factor`` other than 1, ``rope_parameters`` nested
by layer type, a null ``sliding_window`` with sliding layers, and fp8
checkpoints (their q/k rows would need the reordering at load that
full-precision ones get).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, cohere, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, family_activation

DEFAULT_ROPE_THETA = 10000.0  # Cohere2Config has no default_theta of its own
DEFAULT_WINDOW = 4096
DEFAULT_PATTERN = 4


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's attention, as Cohere2Config derives it."""
    num_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        pattern = int(cfg.get("sliding_window_pattern") or DEFAULT_PATTERN)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return checked_layer_types(types, num_layers, "cohere2")


def _window(cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window", DEFAULT_WINDOW)
    if window is None and "sliding_attention" in layer_types(cfg):
        # transformers' sliding layers would then neither slide nor rotate
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return window


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = cohere.llama_keys(cfg)
    out["head_dim"] = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    if cfg.get("rope_theta") is None and cohere.rope_dict(cfg).get("rope_theta") is None:
        out["rope_theta"] = DEFAULT_ROPE_THETA
    out.update(use_sliding_window=True, sliding_window=_window(cfg), layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Cohere2ForCausalLM", "q/k rows are reordered at load")
    rope = cohere.rope_dict(cfg)
    if {"full_attention", "sliding_attention"} & rope.keys():
        raise ValueError("rope_parameters nested by layer type are not supported for cohere2 "
                         "(one RoPE for the sliding layers)")
    refuse_partial_rotary(cfg, rope, "cohere2")
    return FamilyOptions(hidden_act=family_activation(cfg, "cohere2"), float_layer_norm="cohere",
                         parallel_residual=True, interleaved_rope=True,
                         logit_scale=cohere.logit_scale(cfg),
                         nope_layers=tuple(i for i, t in enumerate(layer_types(cfg)) if t == "full_attention"))


DIALECT = Dialect(architectures=("Cohere2ForCausalLM",), llama_keys=llama_keys, options=options)
