"""LongRoPE (Phi-3's ``longrope``, older configs' ``su``): per-frequency
rescaling factors, one list for short contexts and one for long ones, and
an amplitude factor on cos/sin.

transformers picks the list per forward call from the longest position in
it: short while every position is below ``original_max_position_embeddings``,
long from then on. One table shared by every sequence of a batch and a KV
cache that keeps keys rotated as they were written cannot switch like that;
the table here holds the short frequencies for positions below the original
length and the long ones from there on (the choice vLLM makes too). Up to
the original length that is exactly transformers'; past it, keys written
before a sequence crossed the length keep their short rotation (transformers
re-rotates a whole prompt that is longer, which a cache cannot do either).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from splitserve.engine.errors import CheckpointError


def longrope_params(scaling: dict[str, Any], head_dim: int, max_position: int,
                    original_max: int) -> tuple[list[float], list[float], int, float]:
    """(short factors, long factors, original length, cos/sin amplitude) of
    a longrope dict, checked against the rotated dims (``head_dim``)."""
    original = int(scaling.get("original_max_position_embeddings") or original_max or 0)
    if original <= 0:
        raise CheckpointError("config.json: rope scaling 'longrope' needs "
                              "original_max_position_embeddings")
    factors = []
    for key in ("short_factor", "long_factor"):
        f = scaling.get(key)
        if not isinstance(f, list) or len(f) != head_dim // 2:
            raise CheckpointError(f"config.json: rope scaling 'longrope' needs {key} as a list of "
                                  f"{head_dim // 2} numbers (half the rotated dims); got {f!r}")
        factors.append([float(x) for x in f])
    factor = scaling.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the original length
        factor = max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return factors[0], factors[1], original, float(attention_factor)


def longrope_inv_freq(theta: float, dim: int, factors: list[float]) -> torch.Tensor:
    """[dim/2] float32 inverse frequencies divided by ``factors``, computed
    as transformers does."""
    ext = torch.tensor(factors, dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * theta**shape)


def longrope_table(theta: float, dim: int, max_position: int, scaling: dict[str, Any],
                   original_max: int) -> torch.Tensor:
    """[max_position, dim] float32 cos | sin: short frequencies below the
    original length, long ones from it on."""
    short, long, original, amplitude = longrope_params(scaling, dim, max_position, original_max)
    positions = torch.arange(max_position, dtype=torch.float)
    rows = []
    for factors, pos in ((short, positions[:original]), (long, positions[original:])):
        freqs = pos[:, None] * longrope_inv_freq(theta, dim, factors)[None, :]
        rows.append(torch.cat([freqs.cos() * amplitude, freqs.sin() * amplitude], dim=-1))
    return torch.cat(rows)
