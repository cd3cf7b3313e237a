"""EXAONE 3.0 / 3.5 (``ExaoneForCausalLM``): its config.json in Llama's keys,
and its ``FamilyOptions``.

transformers runs it as Llama (``ExaoneConfig`` is a ``LlamaConfig``):
``num_layers``, ``layer_norm_epsilon`` and ``activation_function`` are its
names for ``num_hidden_layers``, ``rms_norm_eps`` and ``hidden_act`` (either
spelling is read); defaults 8 KV heads, eps 1e-5, RoPE base 500000, untied
embeddings, no biases unless ``attention_bias`` / ``mlp_bias`` say so (as
Llama's: ``attention_bias`` covers o_proj too). Its tensors are renamed at
load (``splitserve.engine.models.exaone``), so fp8 checkpoints are refused.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, with transformers' ExaoneConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": 1, "eos_token_id": 361,
           "tie_word_embeddings": False, "max_position_embeddings": 4096, "attention_bias": False,
           "mlp_bias": False}
DEFAULT_KV_HEADS = 8
DEFAULT_ROPE_THETA = 500000.0
DEFAULT_LAYERS = 32


def _renamed_key(cfg: dict[str, Any], key: str, old: str, default: Any) -> Any:
    """``key``, else its EXAONE name ``old``, else ``default``."""
    try:
        return required(cfg, key, old)
    except KeyError:
        return default


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out["num_hidden_layers"] = _renamed_key(cfg, "num_hidden_layers", "num_layers", DEFAULT_LAYERS)
    out["rms_norm_eps"] = _renamed_key(cfg, "rms_norm_eps", "layer_norm_epsilon", 1e-5)
    # a null num_key_value_heads means one per query head, as ExaoneConfig reads it
    out["num_key_value_heads"] = (cfg.get("num_key_value_heads", DEFAULT_KV_HEADS)
                                  or out["num_attention_heads"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if cfg.get("rope_theta") is None and not (isinstance(rope, dict) and rope.get("rope_theta")):
        out["rope_theta"] = DEFAULT_ROPE_THETA
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "ExaoneForCausalLM", "its tensors are renamed at load")
    act = {"hidden_act": _renamed_key(cfg, "hidden_act", "activation_function", "silu")}
    return FamilyOptions(hidden_act=family_activation(act, "exaone"))


DIALECT = Dialect(architectures=("ExaoneForCausalLM",), llama_keys=llama_keys, options=options)
