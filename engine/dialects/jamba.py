"""Jamba (``JambaForCausalLM``, transformers' ``jamba``): its config.json in
Llama's keys, and its ``FamilyOptions``.

As transformers' JambaConfig and its model read it:

- layer i attends where i % ``attn_layer_period`` (8) ==
  ``attn_layer_offset`` (4); every other layer is a Mamba-1 layer
  (``splitserve.engine.models.mamba1``) of ``mamba_expand`` (2) x hidden
  channels, ``mamba_d_state`` (16), a ``mamba_d_conv`` (4)-tap convolution
  (its bias where ``mamba_conv_bias``, on), dt of ``mamba_dt_rank`` ("auto":
  ceil(hidden / 16)) dims, in_proj / out_proj biases where
  ``mamba_proj_bias`` (off), and RMS norms with a weight on dt, B and C
  (``rms_norm_eps``);
- the attention layers apply no positional encoding at all (no RoPE), no
  biases, ``num_key_value_heads`` (8; null: the head count) KV heads;
- layer i's MLP is a sparse block of ``num_experts`` (16; the config
  class's ``num_local_experts``) SwiGLU experts of ``intermediate_size``,
  the top ``num_experts_per_tok`` (2) of the softmax kept unnormalised,
  where i % ``expert_layer_period`` (2) == ``expert_layer_offset`` (1), a
  dense SwiGLU MLP elsewhere (everywhere when ``num_experts`` is 1);
- RMSNorms of ``rms_norm_eps`` (1e-6); the LM head untied by default.

Refused: offsets not below their periods, no Mamba layer at all,
activations other than SiLU, sliding windows, convolutions of fewer than 2
taps, fp8 checkpoints (renamed tensors, untested), tensor parallelism (the
Mamba layers are not sharded), LoRA adapters. A hybrid model's engine caches
prefixes with state checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.mamba import MAMBA
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, HybridLayout
from splitserve.engine.mamba_config import Mamba1Shape

ARCH = "JambaForCausalLM"
# transformers' JambaConfig defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 262144, "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2, "num_experts_per_tok": 2, "expert_layer_period": 2, "expert_layer_offset": 1,
             "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4,
             "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False}


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers' defaults filled in; raises for what is refused."""
    if cfg.get("sliding_window"):
        raise ValueError(f"sliding_window {cfg['sliding_window']} is not supported for {ARCH}")
    out = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    out["num_experts"] = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 16)
    if "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None:  # null: the head count
        out["num_key_value_heads"] = out["num_attention_heads"]
    for kind in ("attn", "expert"):
        period, offset = int(out[f"{kind}_layer_period"]), int(out[f"{kind}_layer_offset"])
        if not 0 <= offset < period:
            raise ValueError(f"{kind}_layer_offset {offset} must be below {kind}_layer_period {period}")
    return out


def layer_kinds(full: dict[str, Any]) -> tuple[str, ...]:
    period, offset = int(full["attn_layer_period"]), int(full["attn_layer_offset"])
    return tuple(ATTENTION if i % period == offset else MAMBA for i in range(int(full["num_hidden_layers"])))


def mamba_shape(full: dict[str, Any]) -> Mamba1Shape:
    hidden = int(full["hidden_size"])
    rank = full["mamba_dt_rank"]
    return Mamba1Shape(inner=int(full["mamba_expand"]) * hidden, state_size=int(full["mamba_d_state"]),
                       conv_kernel=int(full["mamba_d_conv"]),
                       dt_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
                       conv_bias=bool(full["mamba_conv_bias"]), proj_bias=bool(full["mamba_proj_bias"]),
                       dt_norms="weighted", dt_norm_eps=float(full["rms_norm_eps"]))


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = full_config(cfg)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "head_dim", "torch_dtype", "dtype", "quantization_config")
    out = {k: full[k] for k in keys if full.get(k) is not None}
    out["attention_bias"] = False
    experts = full["num_experts"]
    if experts > 1:
        period, offset = int(full["expert_layer_period"]), int(full["expert_layer_offset"])
        layers = int(full["num_hidden_layers"])
        out.update(num_experts=experts, num_experts_per_tok=int(full["num_experts_per_tok"]),
                   moe_intermediate_size=int(full["intermediate_size"]), norm_topk_prob=False,
                   mlp_only_layers=[i for i in range(layers) if i % period != offset])
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the routers and layer norms are renamed at load")
    full = full_config(cfg)
    shape = mamba_shape(full)
    return FamilyOptions(hidden_act=checked_activation(cfg, "jamba"),
                         hybrid=HybridLayout(layer_kinds(full), shape.states()), mamba=shape,
                         final_norm_name="model.final_layernorm",
                         tensor_parallel_refusal="jamba's Mamba layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
