"""Rotary position embedding tables, with the scaling variants checkpoints use.

The engine precomputes one float32 table of cos/sin per model (``kernels``
index it by position), so every scaling variant is reduced here to its
inverse frequencies and an amplitude factor, computed exactly as
transformers computes them (same float32 ops in the same order) so that
logits match the reference implementation bit for bit in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.longrope import longrope_inv_freq, longrope_params, longrope_table
from splitserve.kernels import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling kind named by a config's rope dict (``rope_type`` or the older ``type``)."""
    if not scaling:
        return "default"
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    return "longrope" if kind == "su" else kind  # "su": LongRoPE's first name


def rotary_dim(cfg: ModelConfig) -> int:
    """How many of each head's dims rotate (Phi-3 ``partial_rotary_factor``: the first ones)."""
    return cfg.options.rotary_dim or cfg.head_dim


def _rotated(cfg: ModelConfig) -> ModelConfig:
    # the frequency helpers read head_dim: give them the rotated width
    dim = rotary_dim(cfg)
    return cfg if dim == cfg.head_dim else dataclasses.replace(cfg, head_dim=dim)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, in_float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.rotary_embedding`` on q [T, Hq, D] and k [T, Hk, D]; a table
    narrower than D (partial rotary) turns only each head's first dims.
    ``in_float32``: rotate float32 copies and round once (Cohere's
    ``apply_rotary_pos_emb`` upcasts q and k), not each product in q's dtype."""
    if in_float32 and q.dtype != torch.float32:
        q32, k32 = apply_rotary(positions, q.float(), k.float(), cos_sin_cache)
        return q32.to(q.dtype), k32.to(k.dtype)
    rot = cos_sin_cache.shape[1]
    if rot == q.shape[-1]:
        return ops.rotary_embedding(positions, q, k, cos_sin_cache)
    q_rot, k_rot = ops.rotary_embedding(positions, q[..., :rot].contiguous(), k[..., :rot].contiguous(),
                                        cos_sin_cache)
    q[..., :rot] = q_rot
    k[..., :rot] = k_rot
    return q, k


def _base_inv_freq(theta: float, dim: int, device: torch.device | str) -> torch.Tensor:
    # [dim/2]; int64 arange then float, as transformers does, for identical rounding
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (theta**exponents)


def _param(scaling: dict[str, Any], key: str, kind: str) -> Any:
    if scaling.get(key) is None:
        raise CheckpointError(f"config.json: rope scaling {kind!r} needs {key!r}; got {scaling!r}")
    return scaling[key]


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    factor = float(_param(scaling, "factor", "llama3"))
    low_freq_factor = float(_param(scaling, "low_freq_factor", "llama3"))
    high_freq_factor = float(_param(scaling, "high_freq_factor", "llama3"))
    old_context_len = _param(scaling, "original_max_position_embeddings", "llama3")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic_ntk_inv_freq(cfg: ModelConfig, scaling: dict[str, Any],
                          device: torch.device | str) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence once it is longer than
    max_position_embeddings, and is the plain base up to that length. The
    engine never runs a sequence past max_position (its max_model_len is
    clamped to it), so one table computed at that length, with
    transformers' formula, is exact for every sequence it serves."""
    factor = float(_param(scaling, "factor", "dynamic"))
    dim, seq_len = cfg.head_dim, cfg.max_position
    base = cfg.rope_theta * ((factor * seq_len / cfg.max_position) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim, device)


def _yarn_inv_freq(
    cfg: ModelConfig, scaling: dict[str, Any], device: torch.device | str
) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context): per-frequency blend of interpolated and
    extrapolated frequencies, plus an amplitude factor on cos/sin."""
    dim, base = cfg.head_dim, cfg.rope_theta
    original_max = _param(scaling, "original_max_position_embeddings", "yarn")
    factor = scaling.get("factor")
    if factor is None:
        factor = cfg.max_position / original_max

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).to(device=device, dtype=torch.float)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def inv_freq_and_scale(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """([rotary_dim/2] float32 inverse frequencies, cos/sin amplitude factor);
    LongRoPE: the short-context ones (``build_cos_sin_cache`` uses both)."""
    scaling = cfg.rope_scaling or {}
    kind = rope_type(scaling)
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 and cfg.options.rotary_dim is None:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    cfg = _rotated(cfg)
    if cfg.head_dim % 2:  # rotate-half pairs dim i with i + D/2
        raise CheckpointError(f"config.json: rotary embeddings need an even head_dim; it is {cfg.head_dim}")
    if kind == "default":
        return _base_inv_freq(cfg.rope_theta, cfg.head_dim, device), 1.0
    if kind == "linear":
        factor = float(_param(scaling, "factor", kind))
        return _base_inv_freq(cfg.rope_theta, cfg.head_dim, device) / factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(cfg.rope_theta, cfg.head_dim, device), scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, scaling, device)
    if kind == "dynamic":
        return _dynamic_ntk_inv_freq(cfg, scaling, device), 1.0
    if kind == "longrope":
        short, _, _, amplitude = longrope_params(scaling, cfg.head_dim, cfg.max_position,
                                                 cfg.options.original_max_position)
        return longrope_inv_freq(cfg.rope_theta, cfg.head_dim, short).to(device), amplitude
    raise CheckpointError(
        f"config.json: rope scaling type {kind!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def build_cos_sin_cache(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos in [:, :D/2], sin in [:, D/2:]
    (D: the rotated dims, ``head_dim`` unless partial).

    Rotate-half (neox) layout: frequency i pairs dims i and i + D/2, so one
    half-width cos/sin row per position covers both halves. Computed on the
    CPU, as transformers computes its frequencies, then moved: the same table
    on every device."""
    if rope_type(cfg.rope_scaling) == "longrope":
        rot = _rotated(cfg)
        return longrope_table(rot.rope_theta, rot.head_dim, rot.max_position, rot.rope_scaling,
                              rot.options.original_max_position).to(device)
    inv_freq, amplitude = inv_freq_and_scale(cfg, "cpu")  # [D/2]
    positions = torch.arange(cfg.max_position, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, D/2]
    table = torch.cat([freqs.cos() * amplitude, freqs.sin() * amplitude], dim=-1)
    return table.to(device)
