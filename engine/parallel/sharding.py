"""Each rank loads its slice of every checkpoint tensor, through the model's
``weight_slots`` (``splitserve.engine.models.layers.ShardSlot``).

A model built from ``ShardPlan.local_config`` has the shard's shapes; this
module wraps its slots so the full checkpoint tensor is narrowed to the
rank's part before the slot copies it. Which part, by the projection's
name in Hugging Face checkpoints:

- column-parallel (output rows split): q_proj, gate_proj, up_proj,
  Mixtral's w1/w3 (every expert's too), DeepSeek's q_b_proj / kv_b_proj
  (their rows are per head) and an ungated MLP's up projection by its
  family's name (``FamilyOptions.plain_mlp``: StarCoder2 c_fc, Phi fc1,
  GPT-NeoX dense_h_to_4h): rows [rank * n, (rank + 1) * n) for the
  slot's n rows; k_proj/v_proj: the rows of the rank's KV heads
  (``ShardPlan.kv_heads``, replicated heads included);
- all-head q/k norms (``FamilyOptions.full_qk_norm``: OLMo 2, OLMoE, ...):
  q_norm's weight as q_proj's rows, k_norm's as k_proj's (``qk_norm``);
- row-parallel (input columns split, output summed by one all-reduce):
  o_proj (or the family's ``o_proj_name``: Phi's dense), down_proj (or the
  ungated MLP's down: c_proj, fc2, dense_4h_to_h), Mixtral's w2: columns
  likewise; their bias is added once, by rank 0 (the other ranks hold
  zeros);
- vocabulary-parallel: embed_tokens, lm_head (and Phi's lm_head bias): the
  rank's vocabulary rows;
- attention sinks (gpt-oss ``self_attn.sinks``, one per query head): the
  rank's query heads';
- Gated DeltaNet layers (``linear_attn.``): the rank's key heads and their
  value heads (``ShardPlan.local_config``): rows of the projections grouped
  per key head (in_proj_qkvz, in_proj_ba) or per value head (in_proj_z,
  in_proj_b, in_proj_a), of A_log and dt_bias; in_proj_qkv's and the
  convolution's rows in three parts (the rank's q, k and v channels);
  out_proj row-parallel; the per-head output norm whole;
- everything else (norms, LayerNorms' weights and biases, per-head q/k norms, MoE routers, the shared expert's
  gate, DeepSeek's q_a_proj and kv_a_proj_with_mqa) is whole on every rank;
- an fp8 checkpoint's scales follow their weights (``scale_shards``).
A slot whose shape does not match the narrowed tensor fails the load with
the tensor's name, as an unsharded load would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.layers import ScaleSlot, ShardSlot
from splitserve.engine.parallel.plan import ShardPlan
from splitserve.engine.parallel.scale_shards import scale_part, weight_of_scale

COLUMN = frozenset({"q_proj", "gate_proj", "up_proj", "w1", "w3", "q_b_proj", "kv_b_proj"})
KV = frozenset({"k_proj", "v_proj"})
ROW = frozenset({"o_proj", "down_proj", "w2"})
GDN_ROWS = frozenset({"in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a"})
GDN_CHANNELS = frozenset({"in_proj_qkv", "conv1d"})  # [q | k | v] channels
GDN_PER_HEAD = frozenset({"A_log", "dt_bias"})
VOCAB = frozenset({"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"})


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
class RankPieces:
    """Loads the ranges ``pieces`` ((start, size) each) of dim 0, concatenated,
    into ``slot``."""

    slot: ShardSlot
    pieces: tuple[tuple[int, int], ...]

    def load(self, name: str, tensor: torch.Tensor) -> None:
        for start, size in self.pieces:
            if tensor.dim() == 0 or tensor.shape[0] < start + size:
                raise_shape(name, tensor, RankSlice(self.slot, 0, start, size))
        self.slot.load(name, torch.cat([tensor.narrow(0, s, n) for s, n in self.pieces]))


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


def gated_delta_net_part(name: str, module: str, kind: str, slot: ShardSlot,
                         plan: ShardPlan) -> object | None:
    """The rank's part of a Gated DeltaNet tensor; None: not one, or whole."""
    shape = plan.cfg.options.gated_delta_net
    if shape is None or ".linear_attn." not in name:
        return None
    r, n = plan.rank, plan.size
    if module in GDN_ROWS:
        rows = slot.target.shape[0]
        return RankSlice(slot, 0, r * rows, rows)
    if module == "out_proj":
        cols = slot.target.shape[1]
        return RankSlice(slot, 1, r * cols, cols)
    if kind in GDN_PER_HEAD:
        heads = shape.num_v_heads // n
        return RankSlice(slot, 0, r * heads, heads)
    if module in GDN_CHANNELS:
        return RankPieces(slot, plan.gdn_channels())
    return None


def projection_names(plan: ShardPlan) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The column-parallel, KV-head and row-parallel module names for the
    model's family: the shared ones plus its ungated MLP's up and down, its
    attention output projection by their checkpoint names, and all-head
    q/k norms (``full_qk_norm``: split as q and k are)."""
    opts = plan.cfg.options
    up_down = opts.plain_mlp or ("up_proj", "down_proj")
    column, kv = COLUMN | {up_down[0]}, KV
    if opts.full_qk_norm:
        column, kv = column | {"q_norm"}, kv | {"k_norm"}
    return column, kv, ROW | {up_down[1], opts.o_proj_name}


def shard_slots(slots: dict[str, ShardSlot], plan: ShardPlan) -> dict[str, object]:
    """The model's slots (built from ``plan.local_config()``), each reading
    its rank's part of the full checkpoint tensor."""
    out: dict[str, object] = {}
    head_dim = plan.cfg.head_dim
    column, kv, row = projection_names(plan)
    scales = {n: s for n, s in slots.items() if isinstance(s, ScaleSlot)}
    for name, slot in slots.items():
        if name in scales:
            continue
        parts = name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        rows = slot.target.shape[0]
        recurrent = gated_delta_net_part(name, module, kind, slot, plan)
        if recurrent is not None:
            out[name] = recurrent
        elif name in VOCAB:
            start, end = plan.vocab()
            slot.target.zero_()  # padding rows of the last shard stay zero
            out[name] = RankSlice(ShardSlot(slot.param, 0, end - start), 0, start, end - start)
        elif kind == "sinks":
            h0, h1 = plan.q_heads()
            out[name] = RankSlice(slot, 0, h0, h1 - h0)
        elif module in column:
            out[name] = RankSlice(slot, 0, plan.rank * rows, rows)
        elif module in kv:
            h0, h1 = plan.kv_heads()
            out[name] = RankSlice(slot, 0, h0 * head_dim, (h1 - h0) * head_dim)
        elif module in row and kind == "bias":
            out[name] = slot if plan.rank == 0 else ZeroOnThisRank(slot)
        elif module in row:
            cols = slot.target.shape[1]
            out[name] = RankSlice(slot, 1, plan.rank * cols, cols)
        else:
            out[name] = slot
    for name, slot in scales.items():
        weight = weight_of_scale(name)
        if weight not in out:
            raise CheckpointError(f"tensor {name!r} is an fp8 scale of no weight this model loads")
        out[name] = scale_part(slot, out[weight])
    return out
