"""Arcee (AFM-4.5B: ``ArceeForCausalLM``): its config.json, already in
Llama's keys, with transformers' ArceeConfig defaults, and its
``FamilyOptions``.

Llama's decoder with an ungated MLP, ``up_proj -> hidden_act ->
down_proj`` (default relu2, squared ReLU), biases per ``mlp_bias``;
``attention_bias`` covers q/k/v and o_proj; RMSNorm with eps 1e-5 by
default; untied embeddings, 4096 positions, bos 128000, eos 128001 by
default; RoPE scalings as Llama's (AFM uses yarn). Its checkpoints use
Llama's tensor names, loaded by the shared decoder
(``splitserve.engine.models.llama``), and LoRA adapters take the attention
projections and the MLP's up_proj / down_proj.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' ArceeConfig default (None: left out)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None,
           "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
           "head_dim": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "partial_rotary_factor": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 128000, "eos_token_id": 128001}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return passed_keys(cfg, _PASSED)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=plain_activation(cfg, "arcee", "relu2", key="hidden_act"),
                         plain_mlp=("up_proj", "down_proj"))


DIALECT = Dialect(architectures=("ArceeForCausalLM",), llama_keys=llama_keys, options=options)
