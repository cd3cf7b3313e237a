"""What the Gemma, Gemma 2, Phi-3, Granite and OLMo 2 families add to the
Llama-style decoder, read from their ``config.json``.

``ModelConfig.options`` holds one ``FamilyOptions``; the Llama, Mistral,
Qwen and MoE families keep the defaults, which change nothing. Each field
names the transformers behaviour it reproduces; a checkpoint asking for
something these options cannot express is refused here, before any weight
is read, with a ``ValueError`` that ``ModelConfig.from_hf`` turns into a
``CheckpointError`` naming config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# config.json activation names -> the gated MLP's activation
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}

# The families whose checkpoints need more than the Llama-style defaults.
OPTION_FAMILIES = ("gemma", "gemma2", "phi3", "granite", "olmo2")


@dataclass(frozen=True)
class FamilyOptions:
    hidden_act: str = "silu"  # the gated MLP's activation: silu | gelu_tanh (GeGLU)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    embed_scale: float = 1.0  # Gemma: sqrt(hidden_size); Granite: embedding_multiplier
    # None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar; Granite: attention_multiplier)
    attn_scale: float | None = None
    attn_softcap: float = 0.0  # Gemma 2: cap * tanh(score / cap) on attention scores; 0 = none
    final_softcap: float = 0.0  # Gemma 2: the same on the output logits; 0 = none
    sandwich_norms: bool = False  # Gemma 2: norms after attention and around the MLP
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    rotary_dim: int | None = None  # Phi-3 partial_rotary_factor: dims that rotate; None = all
    original_max_position: int = 0  # Phi-3: LongRoPE's original_max_position_embeddings
    residual_scale: float = 1.0  # Granite residual_multiplier: each block's output scaled before the add
    logits_divisor: float = 1.0  # Granite logits_scaling: the output logits divided by it
    post_norms: bool = False  # OLMo 2: norms on the attention and MLP outputs, none before them
    full_qk_norm: bool = False  # OLMo 2: q/k RMSNorm over every head at once, not per head


def parse_family_options(cfg: dict[str, Any], family: str) -> FamilyOptions:
    """The options of ``family`` from its config.json ``cfg`` (defaults for
    families not in ``OPTION_FAMILIES``)."""
    if family not in OPTION_FAMILIES:
        return FamilyOptions()
    hidden = int(cfg["hidden_size"])
    act = _activation(cfg, family)
    if family == "gemma":
        _no_bidirectional(cfg)
        return FamilyOptions(hidden_act=act, norm_plus_one=True, embed_scale=math.sqrt(hidden))
    if family == "gemma2":
        _no_bidirectional(cfg)
        return FamilyOptions(
            hidden_act=act, norm_plus_one=True, embed_scale=math.sqrt(hidden),
            attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
            attn_softcap=_cap(cfg, "attn_logit_softcapping"),
            final_softcap=_cap(cfg, "final_logit_softcapping"),
            sandwich_norms=True,
        )
    if family == "granite":
        return FamilyOptions(
            hidden_act=act, embed_scale=_multiplier(cfg, "embedding_multiplier"),
            attn_scale=_multiplier(cfg, "attention_multiplier"),
            residual_scale=_multiplier(cfg, "residual_multiplier"),
            logits_divisor=_multiplier(cfg, "logits_scaling"),
        )
    if family == "olmo2":
        return FamilyOptions(hidden_act=act, post_norms=True, full_qk_norm=True)
    # phi3
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) == "yarn":
        raise ValueError("Phi-3 rope scaling 'yarn' (which transformers reads as 'longrope') is "
                         "not supported; write it as 'longrope'")
    return FamilyOptions(hidden_act=act, fused_projections=True, rotary_dim=_rotary_dim(cfg),
                         original_max_position=int(cfg.get("original_max_position_embeddings") or 0))


def _activation(cfg: dict[str, Any], family: str) -> str:
    # Gemma 2 names it hidden_activation; Gemma and Phi-3 hidden_act.
    # Gemma's legacy "gelu" means the tanh approximation (transformers rewrites it so).
    name = cfg.get("hidden_activation") if family == "gemma2" else None
    name = name or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
    if family == "gemma" and name == "gelu":
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported for {family}; supported: "
                         f"{', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rotary_dim(cfg: dict[str, Any]) -> int | None:
    # top level (transformers < 5) or inside rope_parameters / rope_scaling
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    if factor == 1.0:
        return None
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotated dims of {head_dim}; "
                         "an even number in (0, head_dim] is needed")
    return dim


def _multiplier(cfg: dict[str, Any], key: str) -> float:
    # Granite's scalars: 1.0 when absent, as transformers defaults them
    value = cfg.get(key)
    value = 1.0 if value is None else float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{key} must be a positive number, got {cfg.get(key)!r}")
    return value


def _cap(cfg: dict[str, Any], key: str) -> float:
    value = cfg.get(key)
    if value is None:
        return 0.0
    if float(value) <= 0:
        raise ValueError(f"{key} must be positive or null, got {value!r}")
    return float(value)


def _no_bidirectional(cfg: dict[str, Any]) -> None:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention is set: an encoder (embedding) checkpoint, "
                         "not a causal language model")
