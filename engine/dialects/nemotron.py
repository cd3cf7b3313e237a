"""Nemotron (Nemotron-3, Minitron: ``NemotronForCausalLM``): its config.json
in Llama's keys, and its ``FamilyOptions``.

As transformers' NemotronConfig reads it: ``norm_eps`` (default 1e-5) is
the epsilon of its LayerNorm1P norms (weight and bias, the weight applied
as ``1 + weight``: ``splitserve.engine.models.nemotron``); the MLP is
ungated, ``up_proj -> hidden_act -> down_proj`` (default relu2, squared
ReLU), with biases per ``mlp_bias``; ``attention_bias`` covers q/k/v and
o_proj; ``partial_rotary_factor`` (default 0.5) of each head's dims rotate,
rotate-half over those first dims as Phi's; head_dim hidden_size / heads
unless given; untied embeddings, 4096 positions, bos 2, eos 3 by default.
Its checkpoints use Llama's tensor names. A ``rms_norm_eps`` key is not
read (transformers' Nemotron ignores it).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation
from splitserve.engine.dialects.glm import rotary_dim
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' NemotronConfig default (None: left out)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None,
           "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
           "head_dim": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "partial_rotary_factor": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 2, "eos_token_id": 3}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out["rms_norm_eps"] = float(cfg.get("norm_eps", 1e-5))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=plain_activation(cfg, "nemotron", "relu2", key="hidden_act"),
                         layer_norm=True, plain_mlp=("up_proj", "down_proj"),
                         rotary_dim=rotary_dim(cfg, default_head_dim=None))


DIALECT = Dialect(architectures=("NemotronForCausalLM",), llama_keys=llama_keys, options=options)
