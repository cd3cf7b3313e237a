"""Liquid LFM3 (``Lfm3ForCausalLM``, transformers' ``lfm3``): its config.json
in Llama's keys, and its ``FamilyOptions``.

LFM2 (``splitserve.engine.dialects.lfm2``: gated short convolutions beside
attention layers, ``embedding_norm`` last) with, as transformers'
Lfm3Config and its model read it:

- ``layer_types``: ``conv``, ``full_attention`` or ``sliding_attention``
  (a window of ``sliding_window``, 256); by default layer i attends fully
  where i % 4 == 2, slides where i % 4 == 0 (i > 0), else convolves;
- ``conv_L_cache`` 7 taps by default;
- attention as Qwen3's (``q_norm``, ``k_norm`` per head, ``attention_bias``
  on q/k/v/o, ``head_dim`` 128), RoPE per layer type from the nested
  ``rope_parameters`` (``default`` or ``proportional``; by default the
  sliding layers rotate every dim with base 1e4, the full ones a
  proportional half with base 1e6), rotated in float32; with
  ``use_attention_gate`` (on) each head's output times sigmoid(``g_proj``)
  of the layer input (checkpoints name it ``gate_proj``);
- with ``use_sandwich_norm`` (on) the mixer's and the MLP's outputs normed
  again (``post_operator_norm``, ``post_ffn_norm``) before they join the
  residual; the MLP (``w1``, ``w3``, ``w2``) of ``intermediate_size`` as
  written (7680).

Refused: as LFM2 refuses; RoPE types other than default / proportional, a
``rope_parameters`` not nested by layer type, sliding layers without a
window.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.lfm2 import DEFAULT_ROPE_THETA, common_keys, layer_kinds, lfm2_options
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.gemma4_config import LayerRope

ARCH = "Lfm3ForCausalLM"
# keys read as Llama's, with transformers' Lfm3Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 128_000, "hidden_size": 2048, "intermediate_size": 7680, "num_hidden_layers": 24,
           "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
           "max_position_embeddings": 128_000, "attention_bias": False, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "bos_token_id": 124_894, "eos_token_id": 124_900}
_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                 "full_attention": {"rope_type": "proportional", "rope_theta": DEFAULT_ROPE_THETA,
                                    "partial_rotary_factor": 0.5}}
_ATTENTION_TYPES = ("full_attention", "sliding_attention")


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or Lfm3Config's pattern for ``num_hidden_layers``."""
    n = int(cfg.get("num_hidden_layers") or _PASSED["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
                 for i in range(n)]
    layer_kinds({"layer_types": types}, n, attention_types=_ATTENTION_TYPES)  # checked
    return list(types)


def layer_rope(cfg: dict[str, Any], kind: str, head_dim: int) -> LayerRope:
    """The RoPE of ``kind`` layers as Lfm3RotaryEmbedding computes it."""
    nested = cfg.get("rope_parameters") or _DEFAULT_ROPE
    if not set(_ATTENTION_TYPES) & nested.keys():
        raise ValueError("LFM3's rope_parameters must be nested by layer type (full_attention, "
                         "sliding_attention), as transformers writes them")
    params = nested.get(kind)
    if not params:
        raise ValueError(f"rope_parameters has no {kind} entry")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "proportional"):
        raise ValueError(f"rope type {rope_type!r} ({kind}) is not supported for lfm3; supported: "
                         "default, proportional")
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    theta = float(params.get("rope_theta") or DEFAULT_ROPE_THETA)
    if rope_type == "default":  # every pair turns (a partial_rotary_factor is not read)
        return LayerRope(theta, head_dim, head_dim // 2)
    angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    return LayerRope(theta, head_dim, angles, float(params.get("factor", 1.0)))


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    full = {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("norm_eps") is None and cfg.get("rms_norm_eps") is not None:  # its attribute_map
        full["norm_eps"] = cfg["rms_norm_eps"]
    return full


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _merged(cfg)
    types = layer_types(cfg)
    window = cfg.get("sliding_window", 256)
    if window is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    out = common_keys(full, _PASSED, old_tie_key=False)  # Lfm3Config pops no tie_embedding
    out.update(rope_theta=layer_rope(cfg, "full_attention", int(full["head_dim"])).theta,
               attention_bias=bool(full["attention_bias"]), use_sliding_window=window is not None,
               sliding_window=window, layer_types=types)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed at load")
    full = _merged(cfg)
    types = layer_types(cfg)
    kinds = layer_kinds({"layer_types": types}, len(types), attention_types=_ATTENTION_TYPES)
    head_dim = int(full["head_dim"])
    ropes = tuple(None if t == "conv" else layer_rope(cfg, t, head_dim) for t in types)
    fields = lfm2_options(full, "lfm3", kinds, 7, attention_gate=bool(full.get("use_attention_gate", True)),
                          ropes=ropes)
    return FamilyOptions(**fields, sandwich_norms=bool(full.get("use_sandwich_norm", True)))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
