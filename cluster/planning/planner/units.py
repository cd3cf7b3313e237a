"""The estimate's units: one row per (device, TP degree, engine settings) of
a pool role, with its step-time forms, its memory (weights, a full-budget
step's activations, the KV cache in the rest of 90% of device memory, per
rank as the engine sizes it), its price and its place in the offers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.acceptance import length_table
from splitserve.cluster.planning.kv_room import (MIN_BLOCKS, kv_blocks, rank_kv_bytes_per_token,
                                                  state_reserve_bytes)
from splitserve.cluster.planning.planner.candidates import col
from splitserve.cluster.planning.planner.devices import Device, FormCache
from splitserve.cluster.planning.planner.space import EngineGrid, SpaceSpec, tp_splits
from splitserve.cluster.planning.shapes import ModelShape
from splitserve.cluster.planning.sim.speculation import DRAFT_COST_RATIO

MEMORY_UTILIZATION = 0.9  # share of device memory the engine may use
CPU_KV_BYTES = 1 << 30  # KV cache per CPU replica (host memory is shared by every replica)


@dataclass
class Forms:
    """Step-time forms of each unit as arrays: t = oh + max_f (c_f + wp_f P + wa_f A +
    wb_f B + wc_f C); two forms per unit (a one-form fit is repeated)."""

    c: np.ndarray  # (U, 2)
    wp: np.ndarray
    wa: np.ndarray
    wb: np.ndarray
    wc: np.ndarray
    oh: np.ndarray  # (U,)
    compute_form: np.ndarray  # (U, 2) bool: the form that grows with tokens (speculation)
    # a mixture of experts' routed experts: their read time in each form's c (U, 2), and
    # the chance a token passes over one (U,); a step of T tokens skips unread x pass ** T
    unread: np.ndarray | None = None
    expert_pass: np.ndarray | None = None

    def skipped(self, tokens):
        """Per form, the routed read a step of ``tokens`` tokens skips
        (``StepTimeModel.unread_s``), broadcast against ``tokens``."""
        if self.unread is None or not self.unread.any():
            return [0.0, 0.0]
        share = col(self.expert_pass) ** np.asarray(tokens, dtype=np.float64)
        return [col(self.unread[:, k]) * share for k in range(2)]


@dataclass
class Units:
    """One row per (device, TP degree, engine settings) of one pool role."""

    dev: np.ndarray
    tp: np.ndarray
    e: np.ndarray  # engine grid row (prefill units: the first row of its prefill_key)
    forms: Forms
    kv_tokens: np.ndarray  # KV cache tokens per replica
    kv_gib: np.ndarray  # KV cache memory per rank (the pool's kv_cache_memory_gb)
    mem_ok: np.ndarray
    price: np.ndarray  # per replica-hour
    cap: np.ndarray  # most replicas the offer allows
    seqs: np.ndarray
    budget: np.ndarray
    block: np.ndarray
    # speculation by batch size: unit -> table row; per row and running batch size
    # 0..max_num_seqs, the length the engine's rule settles on and the tokens per
    # sequence and step (row 0: no speculation, k 0, one token)
    spec_row: np.ndarray  # (U,)
    spec_k: np.ndarray  # (T, W) int
    spec_g: np.ndarray  # (T, W)
    deployable: np.ndarray
    quality: np.ndarray  # perplexity increase vs the reference (NaN: unknown)
    flops_ok: np.ndarray

    def __len__(self) -> int:
        return len(self.dev)


def spec_tables(space: SpaceSpec, devices: list[Device], dev: np.ndarray, spec: np.ndarray,
                acceptance: dict[str, float]):
    """Speculation length tables (``Units.spec_row``, ``spec_k``, ``spec_g``):
    one row per (speculation setting, device type), by the engine's rule
    (``acceptance.length_table``: the acceptance of the setting's method, the
    device's step curve, a draft model's cost ratio)."""
    width = max(space.max_num_seqs) + 1
    ks, gs = [np.zeros(width, dtype=np.int64)], [np.ones(width)]
    index: dict[tuple[int, str], int] = {}
    rows = np.zeros(len(dev), dtype=np.int64)
    for i, (d, k) in enumerate(zip(dev, spec)):
        name = space.speculative[k]
        if name == "off":
            continue
        dtype = "cpu" if devices[d].cpu else "cuda"
        key = (int(k), dtype)
        if key not in index:
            method, steps = name.split(":")
            t = length_table(int(steps), acceptance[method], dtype, width - 1,
                             DRAFT_COST_RATIO if method == "draft" else 0.0)
            index[key] = len(ks)
            ks.append(t.k)
            gs.append(t.tokens)
        rows[i] = index[key]
    return rows, np.stack(ks), np.stack(gs)


def build_units(devices: list[Device], space: SpaceSpec, grid: EngineGrid, rows: np.ndarray,
                shape: ModelShape, forms: FormCache, quality: np.ndarray,
                tp_support: set[int], acceptance: dict[str, float]) -> Units:
    """Units over ``rows`` of the engine grid, for every device and TP degree;
    ``acceptance``: the per-token rate of each speculation method
    (``PlanContext.acceptance``). A hybrid's hand-off carries its recurrent
    states whole at any degree (gathered from the ranks)."""
    combos = [(d, tp, e) for d in devices for tp in space.tensor_parallel for e in rows
              if not (d.cpu and tp > 1) and tp <= d.count]
    n = len(combos)
    dev = np.array([c[0].index for c in combos], dtype=np.int64)
    tp = np.array([c[1] for c in combos], dtype=np.int64)
    e = np.array([c[2] for c in combos], dtype=np.int64)
    fc = np.zeros((n, 2, 5))
    oh = np.zeros(n)
    unread = np.zeros((n, 2))
    expert_pass = np.zeros(n)
    comp = np.zeros((n, 2), dtype=bool)
    kv_tokens = np.zeros(n)
    kv_gib = np.zeros(n)
    mem_ok = np.zeros(n, dtype=bool)
    flops_ok = np.ones(n, dtype=bool)
    price = np.zeros(n)
    cap = np.zeros(n, dtype=np.int64)
    seqs = grid.seqs[e]
    budget = grid.budget[e]
    block = grid.block[e]
    spec = grid.spec[e]
    spec_row, spec_k, spec_g = spec_tables(space, devices, dev, spec, acceptance)
    # per (device, tp, wd, kv): forms and memory
    for key in sorted({(c[0].index, c[1], int(grid.wd[c[2]]), int(grid.kv[c[2]])) for c in combos}):
        d = devices[key[0]]
        wd, kv = space.weight_dtypes[key[2]], space.kv_dtypes[key[3]]
        sel = (dev == key[0]) & (tp == key[1]) & (grid.wd[e] == key[2]) & (grid.kv[e] == key[3])
        if d.cpu and wd == "fp8":
            flops_ok[sel] = False  # the CPU engine has no fp8 weights
        f, overhead, _, _, settings, (routed, passes) = forms.get(d, key[1], wd, kv)
        fc[sel] = f
        oh[sel] = overhead
        unread[sel] = routed
        expert_pass[sel] = passes
        # the form whose per-token weight on decode sequences is the compute one
        comp[sel, int(np.argmax(f[:, 1]))] = True
        weights = shape.weight_bytes("fp8" if wd == "fp8" else settings.dtype)
        act = budget[sel] * (2 * shape.hidden_size + shape.intermediate_size) * 4.0 / key[1]
        if d.cpu:
            free = np.full(sel.sum(), float(CPU_KV_BYTES))
            fits = np.full(sel.sum(), weights < d.hw.memory_bytes * MEMORY_UTILIZATION)
        else:
            free = d.hw.memory_bytes * key[1] * MEMORY_UTILIZATION - weights - act
            fits = free > 0
        # each rank holds its share of the KV heads (all of one when the heads are
        # fewer than the ranks) in its share of the free memory, after a hybrid
        # model's recurrent states, as the engine sizes it (kv_room.kv_blocks)
        rank_free = np.maximum(free, 0) / key[1]
        blocks = kv_blocks(shape, rank_free, kv_dtype=settings.kv_dtype, dtype=settings.dtype,
                           block_size=block[sel], max_num_seqs=seqs[sel], tensor_parallel=key[1])
        kv_tokens[sel] = blocks * block[sel]
        kv_gib[sel] = rank_free / (1 << 30)
        room = rank_free - state_reserve_bytes(shape, settings.dtype, seqs[sel], tensor_parallel=key[1])
        per_block = rank_kv_bytes_per_token(shape, settings.kv_dtype, key[1]) * block[sel]
        mem_ok[sel] = fits & (room > 0) & (room >= MIN_BLOCKS * per_block)
        price[sel] = d.price * key[1]
        cap[sel] = min(space.max_replicas, d.count // key[1])
    dep = grid.deployable[e] & np.isin(tp, [t for t in tp_support if tp_splits(shape, t)])
    return Units(dev=dev, tp=tp, e=e,
                 forms=Forms(fc[:, :, 0], fc[:, :, 1], fc[:, :, 2], fc[:, :, 3], fc[:, :, 4], oh,
                             comp, unread, expert_pass),
                 kv_tokens=kv_tokens, kv_gib=kv_gib, mem_ok=mem_ok, price=price, cap=cap,
                 seqs=seqs, budget=budget, block=block, spec_row=spec_row, spec_k=spec_k,
                 spec_g=spec_g, deployable=dep,
                 quality=quality[e], flops_ok=flops_ok)
