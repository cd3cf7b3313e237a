"""TII's Falcon-H1 (``FalconH1ForCausalLM``, transformers' ``falcon_h1``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' FalconH1Config and its model read it:

- every layer runs a Mamba-2 mixer (``splitserve.engine.models.mamba2``,
  checkpoint name ``mamba``) and Llama attention side by side on the same
  normed input, their outputs summed (``falcon_h1_config.PARALLEL_KIND``:
  the layer keeps a recurrent state and a KV cache slice);
- Mamba-2: the ``mamba_*`` keys with Granite 4.0-H's defaults
  (``splitserve.engine.dialects.mamba2_keys``), the inner width
  ``mamba_d_ssm`` (1024; null: ``mamba_expand`` x hidden_size); the gated
  RMSNorm only with ``mamba_rms_norm`` (false), gating after the norm with
  ``mamba_norm_before_gate`` (true); out_proj's bias by ``projectors_bias``
  (false), in_proj's by ``mamba_proj_bias``; ``mamba_chunk_size`` only sets
  how transformers' scan is chunked (the result is the same);
- the multipliers (``falcon_h1_config.FalconH1Scales``): ``embedding_multiplier``,
  ``lm_head_multiplier``, ``attention_in_multiplier``,
  ``attention_out_multiplier``, ``key_multiplier``, ``ssm_in_multiplier``,
  ``ssm_out_multiplier`` (1.0 each), ``mlp_multipliers`` (gate, down) and
  ``ssm_multipliers`` (in_proj's z, x, B, C, dt outputs), 1.0 each when absent;
- attention: RoPE over every dim of each head, q/k/v/o biases by
  ``attention_bias``; a SwiGLU ``feed_forward`` (biases by ``mlp_bias``)
  behind ``pre_ff_layernorm``; the final norm ``model.final_layernorm``;
  ``rms_norm_eps`` 1e-5.

Refused: activations other than SiLU (the convolution's too), partial
rotary, ``layers_block_type`` other than "hybrid", fp8 checkpoints (the
Mamba-2 projections are not read in fp8), tensor parallelism, LoRA on
the Mamba-2 ``out_proj`` (PEFT adapts none there). LoRA adapters apply to
the attention projections, the ``feed_forward`` MLP and the mixer's
``in_proj``. A hybrid model's engine caches prefixes with state checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.mamba2_keys import mamba2_shape
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.falcon_h1_config import PARALLEL_KIND, FalconH1Scales
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import HybridLayout

ARCH = "FalconH1ForCausalLM"
# keys read as Llama's, with transformers' FalconH1Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 128000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "rope_parameters": None, "rope_scaling": None,
           "rope_theta": None, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_D_SSM = 1024
# FalconH1Scales field -> its config.json key
_SCALAR_KEYS = {"embedding": "embedding_multiplier", "lm_head": "lm_head_multiplier",
                "attention_in": "attention_in_multiplier", "attention_out": "attention_out_multiplier",
                "key": "key_multiplier", "ssm_in": "ssm_in_multiplier", "ssm_out": "ssm_out_multiplier"}


def _factors(cfg: dict[str, Any], key: str, count: int) -> tuple[float, ...]:
    values = cfg.get(key)
    if values is None:
        return (1.0,) * count
    if len(values) != count:
        raise ValueError(f"{key} must have {count} entries, got {values!r}")
    return tuple(float(v) for v in values)


def scales(cfg: dict[str, Any]) -> FalconH1Scales:
    """The multipliers, 1.0 where config.json leaves one out (or null)."""
    gate, down = _factors(cfg, "mlp_multipliers", 2)
    return FalconH1Scales(mlp_gate=gate, mlp_down=down, **{
        field: float(1.0 if cfg.get(key) is None else cfg[key]) for field, key in _SCALAR_KEYS.items()})


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    if cfg.get("num_key_value_heads", 8) is None:  # the config class's fallback
        out["num_key_value_heads"] = out["num_attention_heads"]
    out.update(qk_norm=False, attention_out_bias=bool(out["attention_bias"]))  # o_proj's, as q/k/v's
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its Mamba-2 projections are not read in fp8")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, ARCH)
    merged = {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}
    num_layers, hidden = int(merged["num_hidden_layers"]), int(merged["hidden_size"])
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types is not None and any(t != "hybrid" for t in types):
        raise ValueError(f"layers_block_type {sorted(set(types))} is not supported for {ARCH}; every "
                         "layer is 'hybrid' (Mamba-2 beside attention)")
    d_ssm = cfg.get("mamba_d_ssm", DEFAULT_D_SSM)
    ssm = _factors(cfg, "ssm_multipliers", 5)
    shape = dataclasses.replace(
        mamba2_shape(cfg, hidden, None if d_ssm is None else int(d_ssm)),
        norm_before_gate=bool(cfg.get("mamba_norm_before_gate", True)),
        gated_norm=bool(cfg.get("mamba_rms_norm", False)), out_proj_bias=bool(cfg.get("projectors_bias", False)),
        in_proj_scales=None if all(f == 1.0 for f in ssm) else ssm)
    kinds = (PARALLEL_KIND,) * num_layers
    return FamilyOptions(
        hidden_act=checked_activation(cfg, "falcon_h1"), final_norm_name="model.final_layernorm",
        hybrid=HybridLayout(kinds, shape.states(), attending_kinds=(PARALLEL_KIND,)), mamba2=shape,
        falcon_h1=scales(cfg),
        tensor_parallel_refusal="falcon_h1's recurrent (Mamba-2) mixers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
