"""Mamba-2 (``Mamba2ForCausalLM``, transformers' ``mamba2``; Codestral Mamba):
its config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' Mamba2Config and its model read it:

- ``hidden_size`` (4096), ``num_hidden_layers`` (64), ``vocab_size`` (32768),
  RMSNorms of ``layer_norm_epsilon`` (1e-5), ``residual_in_fp32`` (on),
  ``tie_word_embeddings`` (off);
- every layer a Mamba-2 mixer (``splitserve.engine.models.mamba2``) of
  ``num_heads`` (128) heads of ``head_dim`` (64), which together must be
  ``expand`` (2) x hidden_size wide; B and C in ``n_groups`` (8) groups of
  ``state_size`` (128); a causal convolution of ``conv_kernel`` (4) taps (a
  bias where ``use_conv_bias``, on); in_proj / out_proj biases where
  ``use_bias`` (off); the time step clamped to ``time_step_limit``; the
  gated RMSNorm over the groups, the gate applied before it;
- no attention layer, so the KV cache has none (the model is run by
  ``splitserve.engine.models.mamba``, as Mamba's).

``max_position_embeddings`` bounds the sequence length where config.json
has one (the engine's default, 2048, otherwise). The training-only keys
(``time_step_min/max/floor``, ``rescale_prenorm_residual``, ``chunk_size``)
change nothing at inference.

Refused: a ``hidden_act`` other than SiLU, heads x head_dim other than the
expanded width, convolutions of fewer than 2 taps, fp8 checkpoints
(untested here), tensor parallelism (the mixers are not sharded), LoRA
adapters. A hybrid model's engine caches prefixes with state checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.mamba2_keys import json_float
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import HybridLayout
from splitserve.engine.mamba2_config import SSM_KIND, Mamba2Shape

ARCH = "Mamba2ForCausalLM"
# transformers' Mamba2Config defaults (None: left out when absent)
_DEFAULTS = {"hidden_size": 4096, "num_hidden_layers": 64, "vocab_size": 32768, "layer_norm_epsilon": 1e-5,
             "num_heads": 128, "head_dim": 64, "state_size": 128, "expand": 2, "conv_kernel": 4, "n_groups": 8,
             "use_bias": False, "use_conv_bias": True, "residual_in_fp32": True, "tie_word_embeddings": False,
             "bos_token_id": 0, "eos_token_id": 2}


def _full(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}


def shape_of(cfg: dict[str, Any]) -> Mamba2Shape:
    full = _full(cfg)
    heads, head_dim = int(full["num_heads"]), int(full["head_dim"])
    inner = int(float(full["expand"]) * int(full["hidden_size"]))
    if heads * head_dim != inner:
        raise ValueError(f"num_heads {heads} x head_dim {head_dim} must equal expand x hidden_size ({inner})")
    limit = full.get("time_step_limit")
    limit = (0.0, math.inf) if limit is None else tuple(json_float(v) for v in limit)
    if len(limit) != 2:
        raise ValueError(f"time_step_limit must be (low, high), got {full.get('time_step_limit')!r}")
    return Mamba2Shape(num_heads=heads, head_dim=head_dim, n_groups=int(full["n_groups"]),
                       state_size=int(full["state_size"]), conv_kernel=int(full["conv_kernel"]),
                       conv_bias=bool(full["use_conv_bias"]), proj_bias=bool(full["use_bias"]),
                       time_step_limit=limit)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _full(cfg)
    hidden = int(full["hidden_size"])
    out = {"hidden_size": hidden, "intermediate_size": int(float(full["expand"]) * hidden),
           "num_hidden_layers": int(full["num_hidden_layers"]), "vocab_size": int(full["vocab_size"]),
           "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,  # no attention layer
           "rms_norm_eps": float(full["layer_norm_epsilon"]),
           "tie_word_embeddings": bool(full["tie_word_embeddings"]),
           "bos_token_id": full["bos_token_id"], "eos_token_id": full["eos_token_id"]}
    for key in ("max_position_embeddings", "torch_dtype", "dtype", "quantization_config"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the mixers' tensors are renamed at load")
    act = cfg.get("hidden_act") or "silu"
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported for {ARCH}; supported: silu")
    shape = shape_of(cfg)
    layers = int(_full(cfg)["num_hidden_layers"])
    return FamilyOptions(hidden_act="silu", hybrid=HybridLayout((SSM_KIND,) * layers, shape.states()),
                         mamba2=shape, residual_in_fp32=bool(_full(cfg)["residual_in_fp32"]),
                         tensor_parallel_refusal="mamba2's Mamba-2 layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
