"""GPT-2 (``GPT2LMHeadModel``): its config.json in the Llama-style keys.

transformers' GPT2Config: ``n_embd``, ``n_layer``, ``n_head``, ``n_inner``
(None: 4 * n_embd), ``n_positions`` (the learned position table's rows),
``layer_norm_epsilon`` (1e-5), ``activation_function`` (``gelu_new``),
``tie_word_embeddings`` (true), bos/eos 50256; every projection has a bias,
one KV head per query head. The model (``splitserve.engine.models.gpt2``)
is the shared decoder with LayerNorm, the plain MLP and the learned
position table.

Scores are scaled by ``1 / sqrt(head_dim)``, not at all with
``scale_attn_weights: false``, and with ``scale_attn_by_inverse_layer_idx``
also divided by layer index + 1. ``reorder_and_upcast_attn`` changes only
where the scale is applied and that scores are float32 under autocast: the
engine keeps scores in float32 anyway, so it is accepted. Refused:
``add_cross_attention`` (an encoder-decoder's cross-attention) and fp8
checkpoints (Conv1D weights are transposed and ``c_attn`` split at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys copied as they are, with transformers' GPT2Config defaults
_PASSED = {"bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": None, "dtype": None}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "n_embd", "hidden_size"))
    heads = int(required(cfg, "n_head", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"n_embd ({hidden}) must be a multiple of n_head ({heads})")
    inner = cfg.get("n_inner")
    return {
        "vocab_size": required(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden if inner is None else int(inner),
        "num_hidden_layers": required(cfg, "n_layer", "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": required(cfg, "n_positions", "max_position_embeddings"),
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    if cfg.get("add_cross_attention"):
        raise ValueError("add_cross_attention (GPT-2 as an encoder-decoder's decoder) is not supported")
    refuse_fp8_checkpoint(cfg, "GPT-2", "Conv1D weights are transposed and c_attn split at load")
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "gpt2", "gelu_new"),
        layer_norm=True,
        plain_mlp=("c_fc", "c_proj"),
        attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
        position_table="model.embed_positions",
        inverse_layer_attn_scale=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
    )


DIALECT = Dialect(architectures=("GPT2LMHeadModel",), llama_keys=llama_keys, options=options)
