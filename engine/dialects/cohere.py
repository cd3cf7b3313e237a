"""Cohere (Command-R, ``CohereForCausalLM``): its config.json in Llama's keys,
and its ``FamilyOptions``.

As transformers' CohereConfig reads it: ``layer_norm_eps`` (default 1e-5)
is the epsilon of its LayerNorms (a weight, no bias, in float32);
``attention_bias`` covers q/k/v and o_proj, the MLP has none; RoPE base
500000 and tied embeddings unless config.json says otherwise;
``logit_scale`` (default 0.0625) multiplies the logits; ``use_qk_norm``
LayerNorms each head's q and k with its own weight. Each layer is the
parallel residual on one norm, RoPE rotates adjacent dim pairs
(``splitserve.engine.models.cohere``). fp8 checkpoints are refused: their
q/k rows would need the reordering at load that full-precision ones get.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, as written
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rope_scaling",
           "attention_bias", "torch_dtype", "dtype", "quantization_config")
# transformers' CohereConfig defaults, where config.json names none
_DEFAULTS = {"layer_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
             "max_position_embeddings": 8192, "bos_token_id": 5, "eos_token_id": 255001,
             "logit_scale": 0.0625}


def _get(cfg: dict[str, Any], key: str) -> Any:
    value = cfg.get(key)
    return _DEFAULTS[key] if value is None else value


def rope_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's rope_parameters (or rope_scaling); {} where none (one
    that is no dict is refused where ModelConfig reads it)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    return params if isinstance(params, dict) else {}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: cfg[k] for k in _COPIED if k in cfg}
    out.update(rms_norm_eps=float(_get(cfg, "layer_norm_eps")),
               tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings")),
               max_position_embeddings=int(_get(cfg, "max_position_embeddings")),
               bos_token_id=cfg.get("bos_token_id", _DEFAULTS["bos_token_id"]),
               eos_token_id=cfg.get("eos_token_id", _DEFAULTS["eos_token_id"]))
    if cfg.get("rope_theta") is None and rope_dict(cfg).get("rope_theta") is None:
        out["rope_theta"] = _DEFAULTS["rope_theta"]
    return out


def logit_scale(cfg: dict[str, Any]) -> float:
    """``logit_scale`` (default 0.0625): a positive number."""
    scale = float(_get(cfg, "logit_scale"))
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"logit_scale must be a positive number, got {cfg.get('logit_scale')!r}")
    return scale


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "CohereForCausalLM", "q/k rows are reordered at load")
    refuse_partial_rotary(cfg, rope_dict(cfg), "cohere")
    return FamilyOptions(hidden_act=family_activation(cfg, "cohere"), float_layer_norm="cohere",
                         parallel_residual=True, interleaved_rope=True, logit_scale=logit_scale(cfg),
                         head_qk_layer_norm=bool(cfg.get("use_qk_norm", False)))


DIALECT = Dialect(architectures=("CohereForCausalLM",), llama_keys=llama_keys, options=options)
