"""OLMo (1) (``OlmoForCausalLM``): its config.json in Llama's keys, and its
``FamilyOptions``.

The Llama decoder with LayerNorms that have no parameters at all, whose
epsilon is 1e-5 whatever config.json says (transformers' OlmoLayerNorm
hard-codes it), and ``clip_qkv``: the q, k and v projections' outputs
clamped to [-clip_qkv, clip_qkv] before RoPE. ``attention_bias`` covers
q/k/v and o_proj, the MLP has none; embeddings untied unless config.json
ties them. Its checkpoints use Llama's tensor names.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, as written
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rope_theta", "rope_parameters", "rope_scaling",
           "attention_bias", "torch_dtype", "dtype", "quantization_config", "bos_token_id")
NORM_EPS = 1e-5  # OlmoLayerNorm's
_DEFAULT_EOS = 50279  # transformers' OlmoConfig


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: cfg[k] for k in _COPIED if k in cfg}
    out.update(rms_norm_eps=NORM_EPS, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
               max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
               eos_token_id=cfg.get("eos_token_id", _DEFAULT_EOS))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    clip = cfg.get("clip_qkv")
    if clip is not None:
        clip = float(clip)
        if not clip > 0 or math.isinf(clip):
            raise ValueError(f"clip_qkv must be a positive number or null, got {cfg.get('clip_qkv')!r}")
    return FamilyOptions(hidden_act=family_activation(cfg, "olmo"), float_layer_norm="none", clip_qkv=clip)


DIALECT = Dialect(architectures=("OlmoForCausalLM",), llama_keys=llama_keys, options=options)
