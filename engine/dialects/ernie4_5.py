"""ERNIE 4.5 (dense, ``Ernie4_5ForCausalLM``): its config.json in Llama's
keys, and its ``FamilyOptions``.

As transformers' Ernie4_5Config and its model read it: the Llama decoder
with ``use_bias`` covering every projection (q/k/v, o_proj, the MLP's),
RoPE on adjacent dim pairs of each head (q/k rows reordered at load,
``splitserve.engine.models.ernie4_5``), and the defaults ``head_dim`` 128
(null: hidden_size / heads), 2 KV heads, eps 1e-5, tied embeddings, RoPE
base 500000, 131072 positions. Rotary over part of each head is refused,
as are fp8 checkpoints (their q/k rows would need the reordering).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, with transformers' Ernie4_5Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": 2, "head_dim": 128,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "max_position_embeddings": 131072}
DEFAULT_THETA = 500000.0  # Ernie4_5Config.default_theta


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's RoPE dict ({} where there is none; one that is no dict is
    refused where ModelConfig reads it)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    return params if isinstance(params, dict) else {}


def ernie_keys(cfg: dict[str, Any], passed: dict[str, Any]) -> dict[str, Any]:
    """The Llama keys of an ERNIE 4.5 config.json (dense or MoE, whose config
    classes default differently: ``passed``): ``use_bias`` on every
    projection, the RoPE base defaulting to Ernie4_5Config's."""
    out = passed_keys(cfg, passed)
    bias = bool(cfg.get("use_bias", False))
    out.update(attention_bias=bias, attention_out_bias=bias, mlp_bias=bias)
    if cfg.get("rope_theta") is None and rope_params(cfg).get("rope_theta") is None:
        out["rope_theta"] = DEFAULT_THETA
    return out


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return ernie_keys(cfg, _PASSED)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Ernie4_5ForCausalLM", "q/k rows are reordered at load")
    refuse_partial_rotary(cfg, rope_params(cfg), "ernie4_5")
    return FamilyOptions(hidden_act=family_activation(cfg, "ernie4_5"), interleaved_rope=True)


DIALECT = Dialect(architectures=("Ernie4_5ForCausalLM",), llama_keys=llama_keys, options=options)
