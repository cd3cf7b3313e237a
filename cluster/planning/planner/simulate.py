"""Stage 4's measurement: a plan (or an operator config) run in the
simulator on the workload's simulated window, judged against the SLOs
after a warm-up, and costed."""

from __future__ import annotations

import time

import numpy as np

from splitserve.cluster.planning.planner.context import PlanContext
from splitserve.cluster.planning.planner.costing import Costing
from splitserve.cluster.planning.planner.emit import EmitContext, Plan, to_config
from splitserve.cluster.planning.planner.request import SimOutcome


def simulate(ctx: PlanContext, emit_ctx: EmitContext, costing: Costing, plan: Plan,
             cfg=None) -> SimOutcome:
    """Run ``plan`` (or an operator config given as ``cfg``, described by
    ``plan``) on the workload's simulated window."""
    from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation

    req = ctx.req
    wl = req.workload
    given = cfg is not None
    cfg = cfg if given else to_config(plan, emit_ctx)
    roles = {role: p.hardware for role, p in plan.pools}

    def hardware(model: str, role: str) -> str:
        return roles.get(role, plan.decode.hardware)

    tail = float(np.percentile(wl.outputs, 99)) * req.slo.tpot_s * 3 + req.slo.ttft_s * 3
    opts = SimOptions(seed=req.seed, drain_s=max(30.0, tail), kv_block_scale=req.kv_block_scale,
                      sample_s=5.0, **{f"spec_acceptance_{m}": a.rate
                                       for m, a in ctx.acceptance.items()})
    t0 = time.perf_counter()
    sim = Simulation(cfg, {cfg.models[0].model.name: req.shape}, hardware, ctx.db,
                     iter(wl.sim_requests), opts)
    rec = sim.run().record
    wall = time.perf_counter() - t0
    # SLOs over the requests that arrive after a warm-up (the cluster starts empty:
    # decode batches fill over about one long request's life)
    arrivals = np.array([r.arrival_s for r in wl.sim_requests])
    span = float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    warm = min(0.5 * span, float(np.percentile(wl.outputs, 90)) * req.slo.tpot_s
               + req.slo.ttft_s)
    got = len(sim.log)
    arr = np.frombuffer(sim.log.arrival, dtype=np.float64)[:got]
    t = np.frombuffer(sim.log.ttft, dtype=np.float64)[:got]
    tp = np.frombuffer(sim.log.tpot, dtype=np.float64)[:got]
    keep = arr >= arrivals[0] + warm - 1e-9
    missing = max(0, int((arrivals >= arrivals[0] + warm - 1e-9).sum()) - int(keep.sum()))
    ttft = np.concatenate([np.where(np.isnan(t[keep]), np.inf, t[keep]),
                           np.full(missing, np.inf)])
    tpot = np.concatenate([np.where(np.isnan(t[keep]), np.inf, tp[keep]),
                           np.full(missing, np.inf)])
    tpot_ok = tpot[~np.isnan(tpot)]
    good = (ttft <= req.slo.ttft_s) & (np.isnan(tpot) | (tpot <= req.slo.tpot_s))
    attainment = float(good.mean()) if len(good) else 0.0
    ttft_p = float(np.percentile(ttft, req.slo.ttft_pct, method="higher")) if len(
        ttft) else float("inf")
    tpot_p = float(np.percentile(tpot_ok, req.slo.tpot_pct, method="higher")) if len(
        tpot_ok) else 0.0
    why = []
    if ttft_p > req.slo.ttft_s:
        why.append("ttft")
    if tpot_p > req.slo.tpot_s:
        why.append("tpot")
    peak = costing.peak_cost(plan)
    mean_cost = costing.mean_cost(plan)
    autoscaled = any(p.autoscaling is not None for m in cfg.models
                     for p in (m.prefill, m.decode))
    if wl.steady and autoscaled:
        # the simulated window is the workload: take the autoscaler's own device-hours
        usd = rec["cost"]["usd"]
        dur = rec["sim"]["simulated_s"]
        if usd is not None and dur > 0:
            mean_cost = usd / dur * 3600.0
    tokens_per_h = wl.mean_rate * float(np.mean(wl.outputs)) * 3600.0
    mean_devices = plan.devices * (mean_cost / peak if peak > 0 else 1.0)
    return SimOutcome(plan, ttft_p, tpot_p, not why, rec["summary"], mean_cost, peak,
                      mean_cost / tokens_per_h * 1e6 if tokens_per_h else float("nan"),
                      mean_devices * 24.0, wall, ",".join(why), attainment,
                      wl.peak_rate * attainment)
