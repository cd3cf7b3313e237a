"""LoRA adapters split across tensor-parallel ranks as their projections are.

An adapter's delta on a projection is x A^T B^T. A column-parallel
projection (q, k, v, gate, up: each rank computes its rows) takes A whole
and the rank's rows of B: its rows of the delta. A row-parallel one (o,
down: each rank multiplies its columns, the block's all-reduce sums the
partial outputs) takes the rank's columns of A and B whole: x_r A_r^T B^T
summed over the ranks is x A^T B^T, added before the same all-reduce. So a
rank's stacks hold its part of every adapter, rank 0 sends each other rank
its parts when an adapter takes a slot (``launcher.TensorParallelRanks.
write_adapter``), and a step's adapter slots travel with its command.

Split: attention (q/k/v rows by query and KV heads, replicated KV heads
included, Qwen3-Next's query-and-gate rows per head too; o) and dense MLPs
(gate/up rows, down; an ungated MLP's up and down by their names in
``FamilyOptions.plain_mlp``, StarCoder2's c_fc / c_proj, as up and down), and the Gated DeltaNet layers of Qwen3-Next and
Qwen3.5 as their weights split (``sharding.gated_delta_net_part``): the
rows of in_proj_qkvz / in_proj_ba (per key head) and in_proj_z / _b / _a
(per value head), in_proj_qkv's q, k and v channel runs, out_proj's
columns. Other hybrids do not split at all (``plan.check``); a projection
without a split here is refused by name when the adapter is registered.
"""

from __future__ import annotations

import torch

from splitserve.engine.lora.adapter import AdapterError
from splitserve.engine.parallel.plan import ShardPlan

ROWS = frozenset({"q_proj", "gate_proj", "up_proj",
                  "in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a"})
KV_ROWS = frozenset({"k_proj", "v_proj"})
COLUMNS = frozenset({"o_proj", "down_proj"})
GDN_COLUMNS = frozenset({"out_proj"})  # a Gated DeltaNet layer's output projection
GDN_CHANNELS = frozenset({"in_proj_qkv"})  # its [q | k | v] channels, three runs per rank

Modules = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def shard_adapter(modules: Modules, plan: ShardPlan) -> Modules:
    """Rank ``plan.rank``'s part of an adapter's (A [r, in], B [out, r]) per
    (layer, projection), from the whole model's."""
    out: Modules = {}
    hd, r, n = plan.cfg.head_dim, plan.rank, plan.size
    gdn = plan.cfg.options.gated_delta_net is not None
    up, down = plan.cfg.options.plain_mlp or ("up_proj", "down_proj")
    for (layer, name), (a, b) in modules.items():
        if name in ROWS or name == up:  # q_proj: Qwen3-Next's query and gate rows of a head are adjacent
            rows = b.shape[0] // n
            out[(layer, name)] = (a, b[r * rows:(r + 1) * rows].contiguous())
        elif name in KV_ROWS:
            h0, h1 = plan.kv_heads()
            out[(layer, name)] = (a, b[h0 * hd:h1 * hd].contiguous())
        elif name in COLUMNS or name == down or (gdn and name in GDN_COLUMNS):
            cols = a.shape[1] // n
            out[(layer, name)] = (a[:, r * cols:(r + 1) * cols].contiguous(), b)
        elif gdn and name in GDN_CHANNELS:
            out[(layer, name)] = (a, torch.cat([b[s:s + k] for s, k in plan.gdn_channels()]))
        else:
            raise AdapterError(f"LoRA on layer {layer}'s {name} is not split across "
                               f"tensor-parallel ranks yet (serve at tensor_parallel_size 1)",
                               param="target_modules")
    return out
