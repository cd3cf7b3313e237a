"""Jais 2 (``Jais2ForCausalLM``): its config.json, already in Llama's keys,
with transformers' Jais2Config defaults, and its ``FamilyOptions``.

Llama's decoder with plain LayerNorms (weight and bias, ``layer_norm_eps``,
default 1e-5; a ``rms_norm_eps`` key is not read) before attention, before
the MLP and after the last layer, and Nemotron's ungated MLP, ``up_proj ->
hidden_act -> down_proj`` (default relu2, squared ReLU). ``attention_bias``
(default on) covers q/k/v and o_proj, ``mlp_bias`` (default on) up and
down; every dim of each head rotates, rotate-half as Llama's; head_dim
hidden_size / heads unless given; untied embeddings, 8192 positions, bos 0,
eos 150024 by default. Its checkpoints use Llama's tensor names, loaded by
the shared decoder (``splitserve.engine.models.llama``), and LoRA adapters
take the attention projections and the MLP's up_proj / down_proj.

Refused: a ``partial_rotary_factor`` other than 1 (transformers' default
RoPE for Jais 2 rotates every dim whatever it says), activations the
ungated MLP does not compute.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_partial_rotary
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' Jais2Config default (None: left out)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None,
           "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
           "head_dim": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "attention_bias": True,
           "mlp_bias": True, "bos_token_id": 0, "eos_token_id": 150024}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out["rms_norm_eps"] = float(cfg.get("layer_norm_eps", 1e-5))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    refuse_partial_rotary(cfg, rope if isinstance(rope, dict) else {}, "Jais2ForCausalLM")
    return FamilyOptions(hidden_act=plain_activation(cfg, "jais2", "relu2", key="hidden_act"),
                         layer_norm=True, plain_mlp=("up_proj", "down_proj"))


DIALECT = Dialect(architectures=("Jais2ForCausalLM",), llama_keys=llama_keys, options=options)
