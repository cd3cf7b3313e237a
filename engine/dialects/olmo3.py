"""OLMo 3 (``Olmo3ForCausalLM``): its config.json in Llama's keys, and its
``FamilyOptions``.

OLMo 2's decoder (norms after attention and the MLP, none before them;
q/k RMSNorms over all heads at once, the float32 weight product) with
sliding windows: ``layer_types`` marks each layer ``sliding_attention``
(a window of ``sliding_window`` tokens, default 4096) or
``full_attention``; without it every fourth layer is full, as
transformers' Olmo3Config fills it in. Each layer type has its own RoPE
(``rope_parameters`` nested by type, as transformers 5 writes it): the
full-attention layers' base and any scaling are the model's main table,
the sliding layers rotate unscaled with their own base
(``FamilyOptions.local_rope_layers`` / ``local_rope_theta``,
``splitserve.engine.models.olmo3``). An older config's top-level
``rope_scaling`` is the full-attention layers' alone, as transformers
reads it. ``attention_bias`` covers q/k/v and o_proj, the MLP has none;
eps 1e-5, untied embeddings and RoPE base 500000 by default.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, family_activation

# keys read as Llama's, with transformers' Olmo3Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None,
           "attention_bias": False, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": None, "eos_token_id": 50279, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "max_position_embeddings": 2048}
DEFAULT_THETA = 500000.0  # Olmo3Config.default_theta
DEFAULT_WINDOW = 4096


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or transformers' default: every fourth layer full attention."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
    return checked_layer_types(types, n, "olmo3")


def rope_by_type(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full-attention, sliding-attention) RoPE dicts as Olmo3Config builds
    them: ``rope_parameters`` nested by layer type, an older top-level
    ``rope_scaling`` merged into the full-attention one. A missing base is
    the top-level ``rope_theta`` for the full-attention layers but always
    500000 for the sliding ones (Olmo3Config pops ``rope_theta`` once)."""
    nested = cfg.get("rope_parameters")
    if nested is not None and not isinstance(nested, dict):
        raise ValueError(f"rope_parameters must be an object, got {nested!r}")
    nested = nested or {}
    if nested and not {"full_attention", "sliding_attention"} & nested.keys():
        raise ValueError("OLMo 3's rope_parameters must be nested by layer type (full_attention, "
                         "sliding_attention), as transformers writes them")
    full = dict(nested.get("full_attention") or {"rope_type": "default"})
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    full.update(scaling or {})
    full.setdefault("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    sliding = dict(nested.get("sliding_attention") or {"rope_type": "default"})
    sliding.setdefault("rope_theta", DEFAULT_THETA)
    for kind, params in (("full_attention", full), ("sliding_attention", sliding)):
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise ValueError(f"partial_rotary_factor {partial} ({kind}) is not supported for olmo3 "
                             "(every dim rotates)")
    kind = sliding.get("rope_type") or sliding.get("type") or "default"
    if kind != "default":
        raise ValueError(f"OLMo 3 rope scaling {kind!r} on the sliding-window layers is not supported "
                         "(only on the full-attention layers)")
    return full, sliding


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    types = layer_types(cfg)
    window = cfg.get("sliding_window", DEFAULT_WINDOW)
    if window is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    out.update(rope_parameters=rope_by_type(cfg)[0], qk_norm=True, mlp_bias=False,
               use_sliding_window=window is not None, sliding_window=window, layer_types=types)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    sliding = rope_by_type(cfg)[1]
    return FamilyOptions(
        hidden_act=family_activation(cfg, "olmo3"), post_norms=True, full_qk_norm=True,
        norm_fp32_product=True,
        local_rope_layers=tuple(i for i, t in enumerate(layer_types(cfg)) if t == "sliding_attention"),
        local_rope_theta=float(sliding["rope_theta"]))


DIALECT = Dialect(architectures=("Olmo3ForCausalLM",), llama_keys=llama_keys, options=options)
