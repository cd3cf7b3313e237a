"""An fp8 checkpoint's scales split across tensor-parallel ranks as their
weights are (``sharding.shard_slots``).

A weight narrowed to rows (or columns) [start, start + size) takes the
scale rows (columns) of the groups it covers: [start / g, ceil(size / g))
for g the checkpoint's group along that dimension (128 for DeepSeek-V3's
128x128 blocks, 1 per output channel). A scale with one group along the
split dimension (per tensor; per channel, split by columns) is whole on
every rank. A rank boundary inside a group cannot be served, since that
group's one scale would then belong to two ranks' differently grouped
shards: ``check_fp8_split`` refuses it from the weights' shapes before any
rank starts (as other engines do: a 768-row expert at 4 ranks is 192 rows,
not a multiple of 128), and the load refuses it again if a shape slipped by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError

if TYPE_CHECKING:  # layers imports parallel.plan, which imports this module
    from splitserve.engine.models.layers import ScaleSlot

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
# the projections split by rows (output channels) and by columns (inputs): sharding.py's
ROW_SPLIT = frozenset({"q_proj", "gate_proj", "up_proj", "w1", "w3", "q_b_proj", "kv_b_proj",
                       "k_proj", "v_proj", "in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b",
                       "in_proj_a", "in_proj_qkv"})
COLUMN_SPLIT = frozenset({"o_proj", "down_proj", "w2"})


@dataclass(frozen=True)
class RankScale:
    """Loads into ``slot`` the scale groups of the weight ``pieces`` ((start,
    size) along ``dim``) this rank holds."""

    slot: ScaleSlot
    dim: int
    pieces: tuple[tuple[int, int], ...]

    def load(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.reshape(1, 1) if tensor.numel() == 1 else tensor
        if t.dim() == 1:  # one per output channel
            t = t[:, None]
        groups = t.shape[self.dim]
        if groups > 1:
            g = self.slot.source[self.dim]
            parts = []
            for start, size in self.pieces:
                first, count = start // g, -(-size // g)
                if start % g or (size % g and first + count != groups):
                    raise CheckpointError(
                        f"tensor {name!r}: this tensor-parallel rank's {_what(self.dim)} "
                        f"[{start}, {start + size}) split its fp8 scale groups of {g}; "
                        "serve it at a degree that splits them whole")
                parts.append(t.narrow(self.dim, first, count))
            t = torch.cat(parts, self.dim) if len(parts) > 1 else parts[0]
        self.slot.load(name, t)


def _what(dim: int) -> str:
    return "rows" if dim == 0 else "columns"


def weight_of_scale(name: str) -> str | None:
    """``x.weight`` for a scale named ``x.weight_scale_inv`` / ``x.weight_scale``."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith("." + suffix):
            return name[:-len(suffix)] + "weight"
    return None


def scale_part(slot: ScaleSlot, weight_part: object) -> object:
    """The rank's part of the scale in ``slot`` whose weight loads through
    ``weight_part`` (a ``RankSlice``, ``RankPieces`` or a whole slot)."""
    from splitserve.engine.parallel.sharding import RankPieces, RankSlice

    if isinstance(weight_part, RankSlice):
        return RankScale(slot, weight_part.dim, ((weight_part.start, weight_part.size),))
    if isinstance(weight_part, RankPieces):
        return RankScale(slot, 0, weight_part.pieces)
    return slot  # the weight is whole on every rank: so is its scale


def check_fp8_split(cfg: ModelConfig, size: int) -> list[str]:
    """Why ``cfg``'s fp8 weights (known once the checkpoint's headers were
    read) cannot split across ``size`` ranks: a rank boundary inside a
    scale group, by the weights' shapes. Replicated KV heads (fewer than
    the ranks) are checked per head."""
    q = cfg.quantization
    if q is None or size == 1:
        return []
    problems = []
    for name, w in sorted(q.weights.items()):
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if len(w.shape) != 2:
            continue
        if module in ROW_SPLIT:
            dim = 0
            per_rank = (w.shape[0] // cfg.num_kv_heads if module in ("k_proj", "v_proj")
                        and cfg.num_kv_heads < size else w.shape[0] // size)
        elif module in COLUMN_SPLIT:
            dim, per_rank = 1, w.shape[1] // size
        else:
            continue
        g = w.groups[dim]
        if g < w.shape[dim] and per_rank % g:
            problems.append(f"{name} [{w.shape[0]}, {w.shape[1]}] splits into {_what(dim)} of "
                            f"{per_rank}, not whole groups of its fp8 scales' {g}")
    if len(problems) > 3:
        problems = problems[:3] + [f"and {len(problems) - 3} more"]
    return problems
