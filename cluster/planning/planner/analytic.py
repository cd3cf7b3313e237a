"""Stages 1-3 of ``splitserve plan``: the space counted, the bounds, and the
vectorised estimate over every remaining combination (the colocated pool's
table; for disaggregated plans the prefill and decode tables, paired in
``pairs.py``). The result is the tables, the candidates the estimate keeps
(cheapest first) and the counts of each stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitserve.cluster.planning.planner.candidates import (
    CLOUD, KEEP, cand_array, cheapest, col, score)
from splitserve.cluster.planning.planner.context import PlanContext
from splitserve.cluster.planning.planner.estimate import (
    RPC_S, PoolTable, decode_table, prefill_table)
from splitserve.cluster.planning.planner.pairs import count_pairs, score_pairs
from splitserve.cluster.planning.planner.space import (
    RouterOption, engine_support, router_options, space_size)
from splitserve.cluster.planning.planner.units import Units, build_units
from splitserve.cluster.planning.planner.workload_stats import WorkloadStats, workload_stats

# a pool role's table: its units, router options, workload statistics and metrics
Table = tuple[Units, list[RouterOption], WorkloadStats, PoolTable]


@dataclass
class Analytic:
    tables: dict[str, Table]  # "colocated", "prefill", "decode"
    candidates: np.ndarray  # candidates.CAND_DTYPE records, cheapest first
    cloud: np.ndarray  # a sample of the estimated combinations, for the plot
    counts: dict  # space, bounds, estimate: deployable and modelled-only


def analytic(ctx: PlanContext) -> Analytic:
    """Count the space, apply the bounds and estimate every remaining
    combination at the workload's peak rate."""
    req, space, grid = ctx.req, ctx.space, ctx.grid
    slo = req.slo
    counts = [d.count for d in ctx.devices]
    rmax = max(1, min(space.max_replicas, max(counts)))
    size = space_size(space, counts)
    sup = engine_support()
    unit_ok_q = np.ones(len(grid), dtype=bool)
    if req.max_ppl_increase is not None:
        unit_ok_q = np.nan_to_num(ctx.quality, nan=np.inf) <= req.max_ppl_increase + 1e-12
    all_rows = np.arange(len(grid))
    prefill_rows = np.unique(grid.prefill_key, return_index=True)[1]
    layouts = space.layouts
    tables: dict[str, tuple] = {}
    bounds = {"deployable": 0, "modelled_only": 0}
    estim = {"deployable": 0, "modelled_only": 0}
    n_auto = len(space.autoscaling)
    cands: list[np.ndarray] = []
    cloud: list[np.ndarray] = []
    rng = np.random.default_rng(req.seed)
    budget = req.budget_per_hour if req.budget_per_hour is not None else np.inf
    kvbpt = np.array([req.shape.kv_bytes_per_token("fp8" if space.kv_dtypes[k] == "fp8"
                                                   else "bfloat16")
                      for k in range(len(space.kv_dtypes))], dtype=np.float64)
    cpu_kv = np.array([req.shape.kv_bytes_per_token("fp8" if space.kv_dtypes[k] == "fp8"
                                                    else "float32")
                       for k in range(len(space.kv_dtypes))], dtype=np.float64)
    # a hybrid's recurrent states travel with each hand-off (GPU pools: bf16, CPU: float32)
    states = (req.shape.state_bytes_per_sequence("bfloat16"),
              req.shape.state_bytes_per_sequence("float32"))
    if "colocated" in layouts:
        opts = router_options(space, "colocated")
        ws = workload_stats(req.workload, opts, rmax, slo.ttft_pct, all_local=True)
        u = build_units(ctx.devices, space, grid, all_rows, req.shape, ctx.forms,
                            ctx.quality, sup["tensor_parallel"], ctx.acceptance_rates)
        t = decode_table(u, opts, ws, slo, rmax, colocated=True, hops=3 * RPC_S)
        extra = (col(unit_ok_q[u.e]) & (t.metrics["cost"] <= budget))
        t.bounds_ok &= extra
        m = t.metrics
        ok1 = t.est_ok & t.bounds_ok & (m["ttft_local"] <= slo.ttft_s) & (
            m["tpot_p"] <= slo.tpot_s)
        oks = t.est_ok & t.bounds_ok & (m["ttft_local"] <= slo.ttft_s * req.slack) & (
            m["tpot_p"] <= slo.tpot_s * req.slack)
        dep = col(u.deployable)
        for name, mask in (("deployable", dep), ("modelled_only", ~dep)):
            bounds[name] += int((t.bounds_ok & mask).sum()) * n_auto
            estim[name] += int((ok1 & mask).sum()) * n_auto
        idx = np.flatnonzero(oks)
        ui, oi, ri = np.unravel_index(idx, oks.shape)
        rec = cand_array(len(idx))
        rec["layout"] = 0
        rec["du"], rec["o"], rec["dr"] = ui, oi, ri + 1
        rec["pu"], rec["pr"] = -1, 0
        rec["cost"] = m["cost"].ravel()[idx]
        rec["ttft"] = m["ttft_local"].ravel()[idx]
        rec["tpot"] = m["tpot_p"].ravel()[idx]
        rec["dep"] = u.deployable[ui]
        rec["q"] = ctx.quality[u.e[ui]]
        rec["ok"] = ok1.ravel()[idx]
        units_key = (u, None, None, ctx.quality_class)
        cands.append(cheapest(rec, KEEP, slo, units_key))
        cands.append(cheapest(rec[rec["dep"]], KEEP, slo, units_key))
        cloud.append(rec[rng.permutation(len(rec))[:CLOUD // 2]])
        tables["colocated"] = (u, opts, ws, t)
    if "disaggregated" in layouts:
        opts = router_options(space, "disaggregated")
        ws = workload_stats(req.workload, opts, rmax, slo.ttft_pct, all_local=False)
        ud = build_units(ctx.devices, space, grid, all_rows, req.shape, ctx.forms,
                             ctx.quality, sup["tensor_parallel"], ctx.acceptance_rates)
        up = build_units(ctx.devices, space, grid, prefill_rows, req.shape, ctx.forms,
                             ctx.quality, sup["tensor_parallel"], ctx.acceptance_rates)
        nic = np.array([d.hw.network_bandwidth * d.hw.efficiency.network for d in ctx.devices])
        kv_of_unit = np.where([ctx.devices[i].cpu for i in up.dev], cpu_kv[grid.kv[up.e]],
                              kvbpt[grid.kv[up.e]])
        td = decode_table(ud, opts, ws, slo, rmax, colocated=False, hops=4 * RPC_S)
        state_of_unit = np.where([ctx.devices[i].cpu for i in up.dev], states[1], states[0])
        tp_ = prefill_table(up, opts, ws, slo, rmax, nic[up.dev], kv_of_unit, state_of_unit)
        td.bounds_ok &= col(unit_ok_q[ud.e]) & (td.metrics["cost"] <= budget)
        tp_.bounds_ok &= col(unit_ok_q[up.e]) & (tp_.metrics["cost"] <= budget)
        td.est_ok &= td.bounds_ok
        tp_.est_ok &= tp_.bounds_ok
        tables["prefill"] = (up, opts, ws, tp_)
        colocated_units = tables.get("colocated", (None,))[0]
        units_key = (colocated_units, ud, up, ctx.quality_class)
        tables["decode"] = (ud, opts, ws, td)
        b = count_pairs(ctx.devices, grid, up, tp_.bounds_ok, ud, td.bounds_ok, len(opts), budget)
        bounds["deployable"] += b[0] * n_auto
        bounds["modelled_only"] += (b[1] - b[0]) * n_auto
        e1, rec_list, cl = score_pairs(
            ctx.devices, grid, ctx.quality, units_key, req.slack,
            ctx.db.handoff_bytes_per_s("grpc"), up, tp_, ud, td, ws, opts, slo, budget,
            kvbpt, cpu_kv, states, rng)
        estim["deployable"] += e1[0] * n_auto
        estim["modelled_only"] += (e1[1] - e1[0]) * n_auto
        cands += rec_list
        cloud += cl
    for k in ("deployable", "modelled_only"):
        bounds[k] = int(bounds[k])
        estim[k] = int(estim[k])
    bounds["total"] = bounds["deployable"] + bounds["modelled_only"]
    estim["total"] = estim["deployable"] + estim["modelled_only"]
    allc = np.concatenate(cands) if cands else cand_array(0)
    return Analytic(tables, allc[np.lexsort((score(allc, slo), allc["cost"]))],
                    np.concatenate(cloud) if cloud else cand_array(0),
                    {"space": size, "bounds": bounds, "estimate": estim})
