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
included; o) and dense MLPs (gate/up rows, down). Refused at TP > 1: the
recurrent mixers' projections (Gated DeltaNet, Mamba) and query-gated
attention (Qwen3-Next's q_proj rows interleave queries and gates), with
the projection's name.
"""

from __future__ import annotations

import torch

from splitserve.engine.lora.adapter import AdapterError
from splitserve.engine.parallel.plan import ShardPlan

ROWS = frozenset({"q_proj", "gate_proj", "up_proj"})
KV_ROWS = frozenset({"k_proj", "v_proj"})
COLUMNS = frozenset({"o_proj", "down_proj"})

Modules = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def lora_split_refusal(plan: ShardPlan) -> str:
    """Why adapters of ``plan``'s model cannot split across its ranks; ""
    where they can (its LoRA targets are attention and dense MLPs)."""
    cfg = plan.cfg
    if plan.size == 1:
        return ""
    if cfg.options.hybrid is not None:
        return (f"{cfg.architecture}: LoRA adapters on a hybrid model's recurrent layers are not "
                "split across tensor-parallel ranks yet (serve it at tensor_parallel_size 1)")
    return ""


def shard_adapter(modules: Modules, plan: ShardPlan) -> Modules:
    """Rank ``plan.rank``'s part of an adapter's (A [r, in], B [out, r]) per
    (layer, projection), from the whole model's."""
    out: Modules = {}
    hd, r, n = plan.cfg.head_dim, plan.rank, plan.size
    for (layer, name), (a, b) in modules.items():
        if name in ROWS and not (name == "q_proj" and b.shape[0] != plan.cfg.num_heads * hd):
            rows = b.shape[0] // n
            out[(layer, name)] = (a, b[r * rows:(r + 1) * rows].contiguous())
        elif name in KV_ROWS:
            h0, h1 = plan.kv_heads()
            out[(layer, name)] = (a, b[h0 * hd:h1 * hd].contiguous())
        elif name in COLUMNS:
            cols = a.shape[1] // n
            out[(layer, name)] = (a[:, r * cols:(r + 1) * cols].contiguous(), b)
        else:
            raise AdapterError(f"LoRA on layer {layer}'s {name} is not split across "
                               f"tensor-parallel ranks yet (serve at tensor_parallel_size 1)",
                               param="target_modules")
    return out
