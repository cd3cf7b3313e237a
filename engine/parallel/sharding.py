"""Each rank loads its slice of every checkpoint tensor, through the model's
``weight_slots`` (``splitserve.engine.models.layers.ShardSlot``).

A model built from ``ShardPlan.local_config`` has the shard's shapes; this
module wraps its slots so the full checkpoint tensor is narrowed to the
rank's part before the slot copies it. Which part, by the projection's
name in Hugging Face checkpoints:

- column-parallel (output rows split): q_proj, gate_proj, up_proj,
  Mixtral's w1/w3 (every expert's too) and DeepSeek's q_b_proj / kv_b_proj
  (their rows are per head): rows [rank * n, (rank + 1) * n) for the
  slot's n rows; k_proj/v_proj: the rows of the rank's KV heads
  (``ShardPlan.kv_heads``, replicated heads included);
- row-parallel (input columns split, output summed by one all-reduce):
  o_proj, down_proj, Mixtral's w2: columns likewise; their bias is added
  once, by rank 0 (the other ranks hold zeros);
- vocabulary-parallel: embed_tokens, lm_head: the rank's vocabulary rows;
- attention sinks (gpt-oss ``self_attn.sinks``, one per query head): the
  rank's query heads';
- everything else (norms, q/k norms, MoE routers, the shared expert's
  gate, DeepSeek's q_a_proj and kv_a_proj_with_mqa) is whole on every rank.
A slot whose shape does not match the narrowed tensor fails the load with
the tensor's name, as an unsharded load would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.layers import ShardSlot
from splitserve.engine.parallel.plan import ShardPlan

COLUMN = frozenset({"q_proj", "gate_proj", "up_proj", "w1", "w3", "q_b_proj", "kv_b_proj"})
KV = frozenset({"k_proj", "v_proj"})
ROW = frozenset({"o_proj", "down_proj", "w2"})
VOCAB = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


@dataclass(frozen=True)
class RankSlice:
    """Loads ``tensor.narrow(dim, start, size)`` into ``slot``."""

    slot: ShardSlot
    dim: int
    start: int
    size: int

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() <= self.dim or tensor.shape[self.dim] < self.start + self.size:
            raise_shape(name, tensor, self)
        self.slot.load(name, tensor.narrow(self.dim, self.start, self.size))


@dataclass(frozen=True)
class ZeroOnThisRank:
    """A row-parallel projection's bias on ranks other than 0: zeros, so the
    all-reduce adds it once."""

    slot: ShardSlot

    def load(self, name: str, tensor: torch.Tensor) -> None:
        self.slot.load(name, torch.zeros_like(tensor))


def raise_shape(name: str, tensor: torch.Tensor, part: RankSlice) -> None:
    raise CheckpointError(f"tensor {name!r} of shape {list(tensor.shape)} has no part "
                          f"[{part.start}, {part.start + part.size}) along dim {part.dim} "
                          "for this tensor-parallel rank")


def shard_slots(slots: dict[str, ShardSlot], plan: ShardPlan) -> dict[str, object]:
    """The model's slots (built from ``plan.local_config()``), each reading
    its rank's part of the full checkpoint tensor."""
    out: dict[str, object] = {}
    head_dim = plan.cfg.head_dim
    for name, slot in slots.items():
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        rows = slot.target.shape[0]
        if name in VOCAB:
            start, end = plan.vocab()
            slot.target.zero_()  # padding rows of the last shard stay zero
            out[name] = RankSlice(ShardSlot(slot.param, 0, end - start), 0, start, end - start)
        elif kind == "sinks":
            h0, h1 = plan.q_heads()
            out[name] = RankSlice(slot, 0, h0, h1 - h0)
        elif module in COLUMN:
            out[name] = RankSlice(slot, 0, plan.rank * rows, rows)
        elif module in KV:
            h0, h1 = plan.kv_heads()
            out[name] = RankSlice(slot, 0, h0 * head_dim, (h1 - h0) * head_dim)
        elif module in ROW and kind == "bias":
            out[name] = slot if plan.rank == 0 else ZeroOnThisRank(slot)
        elif module in ROW:
            cols = slot.target.shape[1]
            out[name] = RankSlice(slot, 1, plan.rank * cols, cols)
        else:
            out[name] = slot
    return out
