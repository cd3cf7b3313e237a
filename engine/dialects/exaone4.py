"""EXAONE 4 (``Exaone4ForCausalLM``): its config.json in Llama's keys, and
its ``FamilyOptions``.

As transformers' Exaone4Config and its model read it: norms on the
attention and MLP outputs, none before them (OLMo 2's layout), Llama-style
RMSNorm rounding; q/k RMSNorms over each head's dims before RoPE; no
biases anywhere. ``layer_types`` marks each layer ``sliding_attention``
(a window of ``sliding_window`` tokens, default 4096) or
``full_attention``; without it every ``sliding_window_pattern``-th layer
(an integer, default 4) is full. While ``sliding_window`` is set the
full-attention layers apply no RoPE at all (``FamilyOptions.nope_layers``);
with it null every layer rotates and none slides. eps 1e-5, untied
embeddings, RoPE base 10000 by default.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, family_activation

# keys read as Llama's, with transformers' Exaone4Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": 32, "head_dim": None,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": 0, "eos_token_id": 2,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 2048}
DEFAULT_WINDOW = 4096
DEFAULT_PATTERN = 4


def window(cfg: dict[str, Any]) -> int | None:
    """``sliding_window``: 4096 when absent, None when null."""
    return cfg.get("sliding_window", DEFAULT_WINDOW)


def layer_types(cfg: dict[str, Any], family: str = "exaone4") -> list[str]:
    """``layer_types``, or as Exaone4Config (and ExaoneMoeConfig) derives it from
    ``sliding_window_pattern``."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern", DEFAULT_PATTERN)
        if window(cfg) is None or not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            shown = "a null sliding_window" if window(cfg) is None else f"sliding_window_pattern {pattern!r}"
            raise ValueError(f"EXAONE 4 with {shown} needs layer_types (transformers derives them "
                             "from a positive integer pattern only)")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    types = checked_layer_types(types, n, family)
    if window(cfg) is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out.update(attention_bias=False, mlp_bias=False, qk_norm=True, use_sliding_window=window(cfg) is not None,
               sliding_window=window(cfg), layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    types = layer_types(cfg)
    # transformers rotates a layer when sliding_window is None or the layer slides
    nope = () if window(cfg) is None else tuple(i for i, t in enumerate(types) if t == "full_attention")
    return FamilyOptions(hidden_act=family_activation(cfg, "exaone4"), post_norms=True, nope_layers=nope)


DIALECT = Dialect(architectures=("Exaone4ForCausalLM",), llama_keys=llama_keys, options=options)
