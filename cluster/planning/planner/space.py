"""The search space of ``splitserve plan`` and its size.

A combination is: layout; hardware, tensor-parallel degree and replicas of
each pool (prefill and decode, or the one colocated pool); the engine
settings of each pool (the decode or colocated pool: ``max_num_seqs``,
``max_num_batched_tokens`` and speculative decoding; the prefill pool: its
own ``max_num_batched_tokens``, its chunk size), and those the hand-off
needs equal in both (block size, KV cache dtype, weight dtype); the router
(policy, and the local-prefill threshold where the policy reads it); the
autoscaling mode (fixed size, scale down in troughs, or room for bursts).

A value is *deployable* when the engine and the operator config support it
today; the others are *modelled-only*: the estimator scores them (so a
report can say what they would buy) but no deployable plan uses them.
Whether a value is supported is read from ``splitserve.cluster.config.ModelSpec``, so
a setting the config learns becomes deployable here without an edit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from splitserve.cluster.config import ModelSpec, RouterSpec

AUTOSCALING = ("fixed", "scale-down", "burst")


def engine_support() -> dict[str, set]:
    """Values of each dimension the deployed engine runs (the rest are modelled-only)."""
    fields = ModelSpec.model_fields
    weight = {"bfloat16"}
    if "weight_dtype" in fields:  # fp8 weights, once the config carries them
        weight.add("fp8")
    tp = {1}
    if "tensor_parallel" in fields or "tensor_parallel_size" in fields:
        tp |= {2, 4, 8}  # each further limited to the degrees a model splits by (tp_splits)
    spec = {"off"}
    if "speculative" in fields or "speculative_method" in fields:
        spec |= {"ngram:2", "ngram:4"}
    kv = set(ModelSpec.model_fields["kv_cache_dtype"].annotation.__args__)
    policies = set(RouterSpec.model_fields["policy"].annotation.__args__)
    return {"weight_dtype": weight, "tensor_parallel": tp, "speculative": spec,
            "kv_cache_dtype": kv, "policy": policies}


def tp_splits(shape, tp: int) -> bool:
    """Whether the engine splits a model of ``shape`` (a ModelShape) over
    ``tp`` ranks: attention heads and the intermediate size divide, KV heads
    divide or are replicated, and no recurrent state or one split by heads
    the degree divides (``state_heads``: the Gated DeltaNet hybrids)
    (splitserve.engine.parallel.plan.check)."""
    kv = shape.num_kv_heads
    states_split = not shape.keeps_state or (shape.state_heads and shape.state_heads % tp == 0)
    return bool(shape.num_heads % tp == 0 and shape.intermediate_size % tp == 0
                and (kv % tp == 0 or tp % kv == 0) and (tp == 1 or states_split))


@dataclass(frozen=True)
class SpaceSpec:
    layouts: tuple[str, ...] = ("colocated", "disaggregated")
    max_num_seqs: tuple[int, ...] = (32, 64, 128, 256, 512)
    max_num_batched_tokens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    block_sizes: tuple[int, ...] = (16, 32)
    kv_dtypes: tuple[str, ...] = ("auto", "fp8")
    weight_dtypes: tuple[str, ...] = ("bfloat16", "fp8")
    tensor_parallel: tuple[int, ...] = (1, 2, 4)
    speculative: tuple[str, ...] = ("off", "ngram:4")
    policies: tuple[str, ...] = ("cost", "prefix_aware", "least_loaded", "round_robin")
    local_prefill: tuple[int, ...] = (0, 128, 512, 2048)  # read by the cost policy only
    autoscaling: tuple[str, ...] = AUTOSCALING
    max_replicas: int = 32  # per pool, below the offers' counts
    # per-token acceptance of speculative drafts, every method; None: the profile
    # database's measured rate for the model, else ASSUMED_ACCEPTANCE
    # (planning.acceptance.resolve, PlanContext.acceptance)
    spec_acceptance: float | None = None

    def replace(self, **kw) -> "SpaceSpec":
        from dataclasses import replace

        return replace(self, **kw)


@dataclass(frozen=True)
class RouterOption:
    policy: str
    local_prefill_max_tokens: int
    global_cache: bool  # placement follows the prefix index (cost, prefix_aware)


def router_options(space: SpaceSpec, layout: str) -> list[RouterOption]:
    """Distinct router settings of a layout: the local-prefill threshold only
    where the policy reads it (cost, disaggregated); colocated pools have no
    prefill replica, where prefix_aware places as cost does."""
    out = []
    for p in space.policies:
        glob = p in ("cost", "prefix_aware")
        if layout == "colocated":
            if p == "prefix_aware" and "cost" in space.policies:
                continue
            out.append(RouterOption(p, 0, glob))
        elif p == "cost":
            out += [RouterOption(p, t, glob) for t in space.local_prefill]
        else:
            out.append(RouterOption(p, 0, glob))
    return out


@dataclass
class EngineGrid:
    """Every engine-settings combination as parallel arrays (one row each)."""

    seqs: np.ndarray
    budget: np.ndarray
    block: np.ndarray
    kv: np.ndarray  # index into space.kv_dtypes
    wd: np.ndarray  # index into space.weight_dtypes
    spec: np.ndarray  # index into space.speculative
    # a prefill pool reads the chunk size and the shared settings only: rows with the
    # same prefill_key are one prefill setting (its first row stands for it)
    prefill_key: np.ndarray
    # the settings both pools of a disaggregated plan must share (block size, KV and
    # weight dtypes): a prefill row pairs with the decode rows of its shared_key
    shared_key: np.ndarray
    deployable: np.ndarray = field(default=None)

    def __len__(self) -> int:
        return len(self.seqs)


def engine_grid(space: SpaceSpec) -> EngineGrid:
    rows = list(itertools.product(range(len(space.max_num_seqs)),
                                  range(len(space.max_num_batched_tokens)),
                                  range(len(space.block_sizes)), range(len(space.kv_dtypes)),
                                  range(len(space.weight_dtypes)), range(len(space.speculative))))
    a = np.array(rows, dtype=np.int64).reshape(-1, 6)
    sup = engine_support()
    dep = np.array([space.weight_dtypes[r[4]] in sup["weight_dtype"]
                    and space.speculative[r[5]] in sup["speculative"]
                    and space.kv_dtypes[r[3]] in sup["kv_cache_dtype"] for r in rows], dtype=bool)
    nb, nk, nw = len(space.block_sizes), len(space.kv_dtypes), len(space.weight_dtypes)
    shared = (a[:, 2] * nk + a[:, 3]) * nw + a[:, 4]
    return EngineGrid(seqs=np.array(space.max_num_seqs)[a[:, 0]],
                      budget=np.array(space.max_num_batched_tokens)[a[:, 1]],
                      block=np.array(space.block_sizes)[a[:, 2]], kv=a[:, 3], wd=a[:, 4],
                      spec=a[:, 5], prefill_key=a[:, 1] * (nb * nk * nw) + shared,
                      shared_key=shared, deployable=dep)


def space_size(space: SpaceSpec, counts: list[int]) -> dict:
    """Combinations in the space (deployable and modelled-only), counted
    without enumerating them: layouts x hardware, TP and replicas of each
    pool within the offers x engine settings (a disaggregated plan's prefill
    pool adds its own chunk size) x router x autoscaling."""
    grid = engine_grid(space)
    sup = engine_support()
    out = {"deployable": 0, "modelled_only": 0}
    n_auto = len(space.autoscaling)
    e_dep = int(grid.deployable.sum())
    e_all = len(grid)
    # prefill pools read neither max_num_seqs nor speculative decoding: no combinations
    # from them there; their chunk size is their own
    n_chunk = len(space.max_num_batched_tokens)
    for layout in space.layouts:
        n_router = len(router_options(space, layout))
        for tp_p, tp_d in itertools.product(space.tensor_parallel, repeat=2):
            if layout == "colocated" and tp_p != space.tensor_parallel[0]:
                continue
            dep_tp = tp_d in sup["tensor_parallel"] and (
                layout == "colocated" or tp_p in sup["tensor_parallel"])
            pools = 0
            if layout == "colocated":
                for c in counts:
                    pools += min(space.max_replicas, c // tp_d)
            else:
                for i, ci in enumerate(counts):
                    for j, cj in enumerate(counts):
                        cap_p = min(space.max_replicas, ci // tp_p)
                        cap_d = min(space.max_replicas, cj // tp_d)
                        if i == j:
                            # p * tp_p + d * tp_d <= count: count pairs directly
                            pools += sum(max(0, min(cap_d, (ci - p * tp_p) // tp_d))
                                         for p in range(1, cap_p + 1))
                        else:
                            pools += cap_p * cap_d
            per_pool = 1 if layout == "colocated" else n_chunk
            total = pools * e_all * per_pool * n_router * n_auto
            dep = pools * e_dep * per_pool * n_router * n_auto if dep_tp else 0
            out["deployable"] += dep
            out["modelled_only"] += total - dep
    out["total"] = out["deployable"] + out["modelled_only"]
    return out
