"""Apertus (``ApertusForCausalLM``): its config.json, in Llama's keys, with
transformers' ApertusConfig defaults, and its ``FamilyOptions``.

The Llama decoder with per-head q/k RMSNorms before RoPE (as Qwen3's) and
an ungated MLP, ``up_proj -> xIELU -> down_proj`` with no biases, whose
xIELU activation has learned scalars per layer
(``splitserve.engine.models.apertus``); ``attention_bias`` covers q/k/v and
o_proj. Defaults: one KV head per query head, eps 1e-5, 65536 positions,
untied embeddings, bos 1, eos 2, and, where config.json names no RoPE at
all, Llama 3 scaling (factor 8 over 8192 positions, frequency factors 1
and 4) on a base of 12,000,000 (also the base of a rope dict that names
none). Other activations than xIELU are refused, as are fp8 checkpoints:
the layer norms are renamed at load, an untested path for them.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' ApertusConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None,
           "rope_parameters": None, "rope_scaling": None, "partial_rotary_factor": None,
           "original_max_position_embeddings": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "max_position_embeddings": 65536, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_THETA = 12_000_000.0  # ApertusConfig.default_theta
# ApertusConfig's rope_parameters when config.json has none
DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": DEFAULT_THETA, "factor": 8.0,
                "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    if "rope_parameters" not in out and "rope_scaling" not in out:
        out["rope_parameters"] = dict(DEFAULT_ROPE)
    out.update(rope_theta=float(cfg.get("rope_theta") or DEFAULT_THETA), qk_norm=True, mlp_bias=False,
               attention_out_bias=bool(out["attention_bias"]))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "ApertusForCausalLM", "its layer norms are renamed at load")
    act = cfg.get("hidden_act") or "xielu"
    if act != "xielu":
        raise ValueError(f"hidden_act {act!r} is not supported for apertus; supported: xielu")
    return FamilyOptions(hidden_act="xielu", plain_mlp=("up_proj", "down_proj"))


DIALECT = Dialect(architectures=("ApertusForCausalLM",), llama_keys=llama_keys, options=options)
