"""CWM (``CwmForCausalLM``): its config.json in Llama's keys, as transformers'
``CwmConfig`` and its model read it.

Llama's decoder (no attention biases whatever config.json says: transformers'
``CwmAttention`` builds q/k/v without them and Qwen2's o_proj has none; MLP biases
per ``mlp_bias``) whose layers ``layer_types`` marks ``sliding_attention`` attend to
the last ``sliding_window`` tokens (8192 by default), the others to all; without
``layer_types`` every 4th layer from layer 0 is full, as CwmConfig derives it.
Defaults: ``head_dim`` 128 (null: hidden_size / num_attention_heads), 8 KV heads,
131072 positions, eps 1e-5, untied embeddings, bos 128000, eos 128001/128008/128009,
RoPE base 1e6 with Llama 3 scaling (factor 16 over 8192 positions) where config.json
has no rope dict. Tensor names are Llama's: the shared decoder loads them as they are,
LoRA adapters, fp8 checkpoints and tensor parallelism included.
Refused: a null (or 0) ``sliding_window`` with sliding layers.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, family_activation

# keys read as Llama's, with transformers' CwmConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 128256, "hidden_size": 6144, "intermediate_size": 21504, "num_hidden_layers": 64,
           "num_attention_heads": 48, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
           "partial_rotary_factor": None, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "mlp_bias": False}
DEFAULT_THETA = 1_000_000.0
DEFAULT_WINDOW = 8192
_DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": DEFAULT_THETA, "factor": 16.0, "high_freq_factor": 4.0,
                 "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or CwmConfig's: every 4th layer (from layer 0) full, the others sliding."""
    n = int(cfg.get("num_hidden_layers", 64))
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
    return checked_layer_types(types, n, "cwm")


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    heads = int(out["num_attention_heads"])
    head_dim, kv_heads = cfg.get("head_dim", 128), cfg.get("num_key_value_heads", 8)
    window = cfg.get("sliding_window", DEFAULT_WINDOW) or None  # CwmConfig reads 0 as none
    types = layer_types(cfg)
    if window is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or _DEFAULT_ROPE
    return {**out, "rope_parameters": rope, "rope_theta": cfg.get("rope_theta") or DEFAULT_THETA,
            "head_dim": int(head_dim) if head_dim is not None else int(out["hidden_size"]) // heads,
            "num_key_value_heads": int(kv_heads) if kv_heads is not None else heads,
            "attention_bias": False, "attention_out_bias": False,
            "use_sliding_window": window is not None, "sliding_window": window, "layer_types": types}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=family_activation(cfg, "cwm"))


DIALECT = Dialect(architectures=("CwmForCausalLM",), llama_keys=llama_keys, options=options)
