"""Persimmon (``PersimmonForCausalLM``): its config.json in Llama's keys, and
its ``FamilyOptions``.

As transformers' PersimmonConfig reads it: one KV head per query head,
head_dim always hidden_size / num_attention_heads (a ``head_dim`` key is
not read), ``layer_norm_eps`` (1e-5) the epsilon of every LayerNorm (weight
and bias), ``qk_layernorm`` (true: q and k LayerNorm-ed over each head's
dims, one weight and bias shared by the heads, before RoPE),
``partial_rotary_factor`` (0.5) of each head's dims rotating rotate-half,
``hidden_act`` (relu2, squared ReLU) in the ungated MLP, biases on every
projection, untied embeddings, 16384 positions, bos 1, eos 2. The model is
``splitserve.engine.models.persimmon``.

Refused, naming the option: rope scaling (``rope_parameters`` of a
``rope_type`` other than default; transformers scales Persimmon's partial
RoPE by its own table) and fp8 checkpoints (the fused query_key_value is
split at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.dialects.glm import rotary_dim
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' PersimmonConfig default (None: left out)
_PASSED = {"vocab_size": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "partial_rotary_factor": None, "torch_dtype": None, "dtype": None,
           "max_position_embeddings": 16384, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "hidden_size"))
    heads = int(required(cfg, "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    return {
        "hidden_size": hidden,
        "intermediate_size": required(cfg, "intermediate_size"),
        "num_hidden_layers": required(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": float(cfg.get("layer_norm_eps", 1e-5)),
        "qk_norm": bool(cfg.get("qk_layernorm", True)),
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Persimmon", "its fused query_key_value is split at load")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else rope
    if kind != "default":
        raise ValueError(f"rope_parameters rope_type {kind!r} is not supported for Persimmon "
                         "(only default RoPE)")
    # the rotated dims of hidden_size / heads, whatever head_dim config.json names
    no_head_dim = {k: v for k, v in cfg.items() if k != "head_dim"}
    return FamilyOptions(hidden_act=plain_activation(cfg, "persimmon", "relu2", key="hidden_act"),
                         layer_norm=True, plain_mlp=("dense_h_to_4h", "dense_4h_to_h"),
                         rotary_dim=rotary_dim(no_head_dim, default_head_dim=None))


DIALECT = Dialect(architectures=("PersimmonForCausalLM",), llama_keys=llama_keys, options=options)
