"""XGLM (``XGLMForCausalLM``): its config.json in the Llama-style keys.

transformers' XGLMConfig: ``d_model``, ``num_layers``, ``attention_heads``,
``ffn_dim`` (the MLP's width), ``max_position_embeddings`` (2048),
``activation_function`` (``gelu``, erf), ``scale_embedding`` (true: token
embeddings times sqrt(d_model)), ``pad_token_id`` (1: the sinusoidal
table's zeroed row), ``tie_word_embeddings`` (true), bos 0, eos 2; every
projection has a bias, one KV head per query head, LayerNorms with torch's
epsilon (1e-5). The model (``splitserve.engine.models.xglm``) is OPT's:
pre-norm layers, the plain MLP, a position table whose position 0 is row
2, here the fixed sinusoidal one transformers computes.

Refused, naming the option: ``add_cross_attention`` (an encoder-decoder's
decoder) and fp8 checkpoints (tensors are renamed at load).
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

POSITION_OFFSET = 2  # XGLMSinusoidalPositionalEmbedding.offset
_PASSED = {"bos_token_id": 0, "eos_token_id": 2, "torch_dtype": None, "dtype": None}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "d_model", "hidden_size"))
    heads = int(required(cfg, "attention_heads", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"d_model ({hidden}) must be a multiple of attention_heads ({heads})")
    return {
        "vocab_size": required(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": required(cfg, "ffn_dim"),
        "num_hidden_layers": required(cfg, "num_layers", "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "rms_norm_eps": 1e-5,  # nn.LayerNorm's default: XGLM names none
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    if cfg.get("add_cross_attention"):
        raise ValueError("add_cross_attention (XGLM as an encoder-decoder's decoder) is not supported")
    refuse_fp8_checkpoint(cfg, "XGLM", "its tensors are renamed at load")
    hidden = int(required(cfg, "d_model", "hidden_size"))
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "xglm", "gelu"),
        layer_norm=True,
        plain_mlp=("fc1", "fc2"),
        o_proj_name="out_proj",
        position_table="model.embed_positions",
        position_offset=POSITION_OFFSET,
        embed_scale=math.sqrt(hidden) if cfg.get("scale_embedding", True) else 1.0,
        position_pad_row=cfg.get("pad_token_id", 1),
    )


DIALECT = Dialect(architectures=("XGLMForCausalLM",), llama_keys=llama_keys, options=options)
