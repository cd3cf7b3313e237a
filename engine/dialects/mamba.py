"""Mamba (``MambaForCausalLM``, transformers' ``mamba``) and Falcon-Mamba
(``FalconMambaForCausalLM``, ``falcon_mamba``): their config.json in
Llama's keys, and their ``FamilyOptions``.

As transformers' MambaConfig / FalconMambaConfig and their models read it:

- ``hidden_size`` (768; the original checkpoints' ``d_model``),
  ``num_hidden_layers`` (32; ``n_layer``), ``vocab_size`` (50280; in the
  original format padded up to a multiple of ``pad_vocab_size_multiple``);
- every layer a Mamba-1 mixer (``splitserve.engine.models.mamba1``) of
  ``expand`` (2) x hidden channels, ``state_size`` (16), ``conv_kernel`` (4)
  taps (a bias where ``use_conv_bias``, on), ``time_step_rank`` ("auto":
  ceil(hidden / 16)), in_proj / out_proj biases where ``use_bias`` (off);
  Falcon-Mamba RMS-normalises dt, B and C without a weight (``mixer_rms_eps``,
  1e-6);
- RMSNorms of ``layer_norm_epsilon`` (1e-5); ``residual_in_fp32`` (on);
  ``tie_word_embeddings`` (on); no attention layer, so the KV cache has none.

The original format is read where ``architectures`` names MambaForCausalLM
(state-spaces' own config.json names none: the key must be added).
``max_position_embeddings`` bounds the sequence length where config.json
has one; Mamba has no position limit of its own, so the engine's default
(2048) applies otherwise: raise it with that key. The training-only keys
(``time_step_*`` init, ``rescale_prenorm_residual``, ``use_mambapy``,
``use_associative_scan``) change nothing at inference.

Refused: a ``hidden_act`` other than SiLU, convolutions of fewer than 2 taps,
the original format's LayerNorm (``rms_norm`` false) and other ``ssm_cfg``
layers than Mamba-1, fp8 checkpoints (untested here), tensor parallelism
(the mixers are not sharded), LoRA adapters. A hybrid model's engine caches
prefixes with state checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import HybridLayout
from splitserve.engine.mamba_config import Mamba1Shape

ARCH, FALCON_ARCH = "MambaForCausalLM", "FalconMambaForCausalLM"
MAMBA = "mamba"  # the layer kind of HybridLayout
# the original checkpoints' ssm_cfg keys -> transformers' names
_SSM_CFG = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "dt_rank": "time_step_rank",
            "conv_bias": "use_conv_bias", "bias": "use_bias"}


def full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json in transformers' names (the original format's read too)."""
    out = dict(cfg)
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"ssm_cfg layer {layer!r} is not supported; supported: Mamba1")
    unknown = sorted(set(ssm) - set(_SSM_CFG))
    if unknown:
        raise ValueError(f"ssm_cfg keys {unknown} are not supported; supported: {sorted(_SSM_CFG)}")
    out.update({_SSM_CFG[k]: v for k, v in ssm.items()})
    if cfg.get("rms_norm") is False:
        raise ValueError("rms_norm false (LayerNorm) is not supported for Mamba")
    if out.get("hidden_size") is None and out.get("d_model") is not None:  # the original format
        vocab = int(required(cfg, "vocab_size"))
        multiple = int(cfg.get("pad_vocab_size_multiple") or 1)
        out.update(hidden_size=out["d_model"], vocab_size=-(-vocab // multiple) * multiple)
        if out.get("tie_word_embeddings") is None and out.get("tie_embeddings") is not None:
            out["tie_word_embeddings"] = out["tie_embeddings"]
    if out.get("num_hidden_layers") is None and out.get("n_layer") is not None:
        out["num_hidden_layers"] = out["n_layer"]
    return out


def inner_size(cfg: dict[str, Any], hidden: int) -> int:
    """The mixers' channels: int(expand x hidden), as transformers sizes them."""
    return int(float(cfg.get("expand") or 2) * hidden)


def mamba_shape(cfg: dict[str, Any], dt_norms: str) -> Mamba1Shape:
    hidden = int(cfg.get("hidden_size") or 768)
    rank = cfg.get("time_step_rank", "auto")
    return Mamba1Shape(inner=inner_size(cfg, hidden), state_size=int(cfg.get("state_size") or 16),
                       conv_kernel=int(cfg.get("conv_kernel") or 4),
                       dt_rank=math.ceil(hidden / 16) if rank in ("auto", None) else int(rank),
                       conv_bias=bool(cfg.get("use_conv_bias", True)), proj_bias=bool(cfg.get("use_bias", False)),
                       dt_norms=dt_norms, dt_norm_eps=float(cfg.get("mixer_rms_eps") or 1e-6))


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = full_config(cfg)
    hidden = int(full.get("hidden_size") or 768)
    out = {"hidden_size": hidden, "intermediate_size": inner_size(full, hidden),
           "num_hidden_layers": int(full.get("num_hidden_layers") or 32),
           "vocab_size": int(full.get("vocab_size") or 50280),
           "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,  # no attention layer
           "rms_norm_eps": float(full.get("layer_norm_epsilon") or 1e-5),
           "tie_word_embeddings": bool(full.get("tie_word_embeddings", True)),
           "bos_token_id": full.get("bos_token_id", 0), "eos_token_id": full.get("eos_token_id", 0)}
    for key in ("max_position_embeddings", "torch_dtype", "dtype", "quantization_config"):
        if full.get(key) is not None:
            out[key] = full[key]
    return out


def _options(cfg: dict[str, Any], arch: str, dt_norms: str) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, arch, "untested: the mixers' tensors are renamed at load")
    full = full_config(cfg)
    act = full.get("hidden_act") or "silu"
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported for {arch}; supported: silu")
    shape = mamba_shape(full, dt_norms)
    layers = int(full.get("num_hidden_layers") or 32)
    family = "falcon_mamba" if arch == FALCON_ARCH else "mamba"
    return FamilyOptions(hidden_act="silu", hybrid=HybridLayout((MAMBA,) * layers, shape.states()), mamba=shape,
                         residual_in_fp32=bool(full.get("residual_in_fp32", True)),
                         tensor_parallel_refusal=f"{family}'s Mamba layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=lambda cfg: _options(cfg, ARCH, ""))
FALCON_DIALECT = Dialect(architectures=(FALCON_ARCH,), llama_keys=llama_keys,
                         options=lambda cfg: _options(cfg, FALCON_ARCH, "weightless"))
