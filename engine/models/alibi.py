"""ALiBi (attention with linear biases), in place of RoPE: head h's score of
a key is biased by ``slope_h * (key position - query position)``, the
slopes a geometric sequence over the heads. Bloom, MPT and Falcon with
``alibi: true`` use it (``FamilyOptions.alibi``); the attention kernels
take the slopes (``alibi_slopes``, splitserve.kernels.reference). A
tensor-parallel rank's attention holds its own query heads' slopes
(``shard_alibi_slopes``).

transformers writes the bias in other forms that softmax cannot tell
apart from this one: Bloom's ``build_alibi_tensor`` adds ``slope * key
position`` and MPT's ``build_mpt_alibi_tensor`` ``slope * (key position -
last key position)``, both a constant per query row away from it.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.parallel.plan import ShardPlan


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[num_heads] float32 slopes, as transformers' Bloom ``_get_alibi_slopes``:
    for the largest power of two p <= num_heads, 2 ** (-8 i / p) for i in
    1..p, then for the heads past p every other one of the 2p-head
    sequence (2 ** (-4 i / p), i = 1, 3, 5...). MPT's
    ``build_mpt_alibi_tensor`` with alibi_bias_max 8 gives the same slopes."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(p) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + p, dtype=torch.int32))
    if p != num_heads:
        extra = torch.full((), 2 ** (-(2 ** -(math.log2(2 * p) - 3))), dtype=torch.float32)
        powers = torch.arange(1, 1 + 2 * min(p, num_heads - p), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra, powers)])
    return slopes


def family_alibi_slopes(cfg: ModelConfig, device: torch.device | str) -> torch.Tensor | None:
    """The [num_heads] float32 slopes of ``cfg``'s family (None: no ALiBi):
    Bloom's and MPT's as ``alibi_slopes``; Falcon's rounded to bfloat16 and
    divided by sqrt(head_dim), as ``FalconModel`` builds and scales its
    bias. (Falcon also rounds each ``slope * key position`` to bfloat16;
    that is exact for positions below 256 when the slope is a power of two,
    as it is for up to 8 heads, and the float32 product here is otherwise
    within bfloat16's rounding of it.)"""
    kind = cfg.options.alibi
    if not kind:
        return None
    slopes = alibi_slopes(cfg.num_heads)
    if kind == "falcon":
        slopes = slopes.bfloat16().float() / math.sqrt(cfg.head_dim)
    return slopes.to(device)


def shard_alibi_slopes(layers: Iterable[nn.Module], plan: ShardPlan) -> None:
    """Give each layer's attention, built for a tensor-parallel rank's heads,
    those heads' slopes: rank r's ``plan.q_heads()`` of the full model's
    (a rank's local config alone would restart the sequence at its first
    head). No-op without ALiBi."""
    full = family_alibi_slopes(plan.cfg, "cpu")
    if full is None:
        return
    h0, h1 = plan.q_heads()
    for layer in layers:
        attn = layer.self_attn
        attn.alibi_slopes = full[h0:h1].to(attn.alibi_slopes.device).contiguous()
