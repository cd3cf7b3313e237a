"""``splitserve plan``: bounds, a vectorised estimate, then the simulator.

1. **space**: every combination of the search space (``space.py``),
   counted, deployable and modelled-only apart.
2. **bounds**: combinations that cannot meet the SLOs under the step-time
   model whatever the queueing (memory fit, latency floors of a prompt
   alone or a batch of one, utilization >= 1, network), or that break the
   offers' device counts, the budget or the quality floor, are dropped.
3. **estimate**: every remaining combination is scored by the analytic
   model (``estimate.py``) at the workload's peak rate; the ones predicted
   within the SLOs are kept, the cheapest (with a slack for the model's
   error) go on.
4. **simulate**: the cheapest distinct hardware allocations among them
   (some of each layout) run in the simulator on the workload: the
   production RouterCore, autoscaling decision and engine Scheduler. A
   finalist that misses an SLO is repaired (a replica more on the pool
   that missed) and a winner is trimmed (a replica less while the
   simulator still meets the SLOs), within the simulation budget.

The choice is the cheapest simulated plan that meets the SLOs, the quality
floor and the budget; the Pareto front is over the simulated plans.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner import estimate as est
from splitserve.cluster.planning.planner.candidates import (
    CLOUD, KEEP, cand_array, cheapest, col, fitted, score)
from splitserve.cluster.planning.planner.emit import (
    EmitContext, EnginePlan, Plan, PoolEngine, PoolPlan, to_config)
from splitserve.cluster.planning.planner.inputs import SLO, Offer, PlanInputError, WorkloadModel
from splitserve.cluster.planning.planner.pairs import count_pairs, score_pairs
from splitserve.cluster.planning.planner.space import (
    SpaceSpec, engine_grid, engine_support, router_options, space_size)
from splitserve.cluster.planning.shapes import ModelShape



@dataclass
class PlanRequest:
    shape: ModelShape
    model_name: str
    model_path: str | None
    workload: WorkloadModel
    slo: SLO
    offers: list[Offer]
    max_ppl_increase: float | None = 0.0  # relative (0.01 = 1%); None: no floor
    budget_per_hour: float | None = None
    space: SpaceSpec = field(default_factory=SpaceSpec)
    finalists: int = 10
    max_sims: int = 24
    time_budget_s: float = 110.0  # no simulation starts after this many seconds of planning
    slack: float = 1.3  # the estimate's SLOs are relaxed by this for candidacy
    seed: int = 0
    kv_block_scale: int = 1
    base_config: dict | None = None  # the current config (re-planning): kept keys


@dataclass
class SimOutcome:
    plan: Plan
    ttft_p: float
    tpot_p: float
    meets: bool
    summary: dict
    cost_per_hour: float  # mean over the workload's curve
    peak_cost_per_hour: float
    usd_per_m_tokens: float
    gpu_hours_per_day: float
    wall_s: float
    why: str = ""  # what missed
    attainment: float = 0.0  # share of requests after the warm-up within both SLOs
    goodput: float = 0.0  # req/s within both SLOs: the peak rate x attainment

    def to_dict(self) -> dict:
        s = self.summary
        return {"plan": self.plan.to_dict(), "predicted": self.plan.predicted,
                "simulated": {
                    "ttft_p": self.ttft_p, "tpot_p": self.tpot_p, "meets_slo": self.meets,
                    "why": self.why, "goodput": self.goodput, "slo_attainment": self.attainment,
                    "run_goodput": s["goodput"], "run_slo_attainment": s["slo_attainment"],
                    "ttft": s["ttft"], "tpot": s["tpot"],
                    "request_throughput": s["request_throughput"], "errors": s["errors"],
                    "local_prefill_share": s["local_prefill_share"], "wall_s": self.wall_s},
                "cost_per_hour": self.cost_per_hour, "peak_cost_per_hour": self.peak_cost_per_hour,
                "usd_per_million_output_tokens": self.usd_per_m_tokens,
                "gpu_hours_per_day": self.gpu_hours_per_day}


@dataclass
class PlanResult:
    request: PlanRequest
    devices: list
    counts: dict
    timings: dict
    outcomes: list[SimOutcome]
    chosen: SimOutcome | None
    best_colocated: SimOutcome | None
    best_modelled: Plan | None
    best_deployable_estimate: Plan | None
    cloud: dict
    emit: EmitContext
    forms: dict
    explanation: list[str] = field(default_factory=list)


# -- quality -------------------------------------------------------------------------
def quality_increases(db: ProfileDB, shape: ModelShape,
                      space: SpaceSpec) -> dict[tuple[str, str], float]:
    """(weight dtype, kv dtype) -> relative perplexity increase against the
    reference (bf16 weights, KV in the weights' dtype), from the database's
    quality rows: a setting's row over the row of the same model, device and
    weight dtype with the reference KV. The reference itself is 0; a pair
    without rows is missing (unknown)."""
    rows = db.quality(shape.key) or db.quality(shape.name)
    by: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r["metric"] != "perplexity":
            continue
        parts = str(r["settings"]).split("/")
        if len(parts) < 3:
            continue
        device, dtype, kv = parts[0], parts[1], parts[2].removeprefix("kv-")
        by.setdefault((device, dtype, kv), []).append(float(r["value"]))
    out: dict[tuple[str, str], float] = {("bfloat16", "auto"): 0.0}
    fp8_kv = []
    for (device, dtype, kv), vals in by.items():
        if kv != "fp8" or dtype == "fp8":
            continue
        ref = by.get((device, dtype, dtype))
        if ref:
            fp8_kv.append(vals[-1] / ref[-1] - 1.0)
    if fp8_kv:
        out[("bfloat16", "fp8")] = float(np.mean(fp8_kv))
    fp8_w = []
    for (device, dtype, kv), vals in by.items():
        ref = by.get((device, "bfloat16", "bfloat16" if kv == "fp8" else kv))
        if dtype == "fp8" and kv != "fp8" and ref:
            fp8_w.append(vals[-1] / ref[-1] - 1.0)
    if fp8_w:
        out[("fp8", "auto")] = float(np.mean(fp8_w))
        if ("bfloat16", "fp8") in out:
            out[("fp8", "fp8")] = out[("fp8", "auto")] + out[("bfloat16", "fp8")]
    return out


def _quality_rows(space: SpaceSpec, grid, q: dict) -> np.ndarray:
    vals = np.full(len(grid), np.nan)
    for k in range(len(grid)):
        key = (space.weight_dtypes[grid.wd[k]], space.kv_dtypes[grid.kv[k]])
        if key in q:
            vals[k] = q[key]
    return vals


# -- the planner -------------------------------------------------------------------------
class Planner:
    def __init__(self, req: PlanRequest, db: ProfileDB, log=lambda s: None):
        self.req = req
        self.db = db
        self.log = log
        self.devices = est.resolve_devices(db, req.offers)
        self.space = req.space
        self.grid = engine_grid(req.space)
        self.forms = est.FormCache(db, req.shape)
        q = quality_increases(db, req.shape, req.space)
        self.quality_table = q
        self.quality = _quality_rows(req.space, self.grid, q)
        self._quality_class = self.grid.kv * 4 + self.grid.wd
        uncached = np.maximum(1, req.workload.inputs - req.workload.cached)
        self._short_prompt = max(1.0, float(np.percentile(uncached, 5)))
        self.timings: dict[str, float] = {}
        self.counts: dict = {}
        wl = req.workload
        self.emit_ctx = EmitContext(
            model_name=req.model_name, model_path=req.model_path, ttft_s=req.slo.ttft_s,
            tpot_s=req.slo.tpot_s,
            trough=float(wl.curve.min()) if len(wl.curve) else 1.0,
            network_bytes_per_s=min(d.hw.network_bandwidth * d.hw.efficiency.network
                                    * (1 if d.cpu else est.DEVICES_PER_NODE)
                                    for d in self.devices),
            max_queue=max(256, int(4 * wl.peak_rate * (req.slo.ttft_s + float(
                np.mean(wl.outputs)) * req.slo.tpot_s)) + 16),
            base=req.base_config)

    # -- stages 1-3 -------------------------------------------------------------------
    def analytic(self):
        t0 = time.perf_counter()
        req, space, grid = self.req, self.space, self.grid
        slo = req.slo
        counts = [d.count for d in self.devices]
        rmax = max(1, min(space.max_replicas, max(counts)))
        size = space_size(space, counts)
        self.counts["space"] = size
        sup = engine_support()
        unit_ok_q = np.ones(len(grid), dtype=bool)
        if req.max_ppl_increase is not None:
            unit_ok_q = np.nan_to_num(self.quality, nan=np.inf) <= req.max_ppl_increase + 1e-12
        all_rows = np.arange(len(grid))
        prefill_rows = np.unique(grid.prefill_key, return_index=True)[1]
        layouts = space.layouts
        self.tables = {}
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
        if "colocated" in layouts:
            opts = router_options(space, "colocated")
            ws = est.workload_stats(req.workload, opts, rmax, slo.ttft_pct, all_local=True)
            u = est.build_units(self.devices, space, grid, all_rows, req.shape, self.forms,
                                self.quality, sup["tensor_parallel"])
            t = est.decode_table(u, opts, ws, slo, rmax, colocated=True, hops=3 * est.RPC_S)
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
            rec["q"] = self.quality[u.e[ui]]
            rec["ok"] = ok1.ravel()[idx]
            self._units_key = (u, None, None, self._quality_class)
            cands.append(cheapest(rec, KEEP, slo, self._units_key))
            cands.append(cheapest(rec[rec["dep"]], KEEP, slo, self._units_key))
            cloud.append(rec[rng.permutation(len(rec))[:CLOUD // 2]])
            self.tables["colocated"] = (u, opts, ws, t)
        if "disaggregated" in layouts:
            opts = router_options(space, "disaggregated")
            ws = est.workload_stats(req.workload, opts, rmax, slo.ttft_pct, all_local=False)
            ud = est.build_units(self.devices, space, grid, all_rows, req.shape, self.forms,
                                 self.quality, sup["tensor_parallel"])
            up = est.build_units(self.devices, space, grid, prefill_rows, req.shape, self.forms,
                                 self.quality, sup["tensor_parallel"])
            nic = np.array([d.hw.network_bandwidth * d.hw.efficiency.network for d in self.devices])
            kv_of_unit = np.where([self.devices[i].cpu for i in up.dev], cpu_kv[grid.kv[up.e]],
                                  kvbpt[grid.kv[up.e]])
            td = est.decode_table(ud, opts, ws, slo, rmax, colocated=False, hops=4 * est.RPC_S)
            tp_ = est.prefill_table(up, opts, ws, slo, rmax, nic[up.dev], kv_of_unit)
            td.bounds_ok &= col(unit_ok_q[ud.e]) & (td.metrics["cost"] <= budget)
            tp_.bounds_ok &= col(unit_ok_q[up.e]) & (tp_.metrics["cost"] <= budget)
            td.est_ok &= td.bounds_ok
            tp_.est_ok &= tp_.bounds_ok
            self.tables["prefill"] = (up, opts, ws, tp_)
            colocated_units = self.tables.get("colocated", (None,))[0]
            self._units_key = (colocated_units, ud, up, self._quality_class)
            self.tables["decode"] = (ud, opts, ws, td)
            b = count_pairs(self.devices, grid, up, tp_.bounds_ok, ud, td.bounds_ok, len(opts), budget)
            bounds["deployable"] += b[0] * n_auto
            bounds["modelled_only"] += (b[1] - b[0]) * n_auto
            e1, rec_list, cl = score_pairs(
                self.devices, grid, self.quality, self._units_key, req.slack,
                self.db.handoff_bytes_per_s("grpc"), up, tp_, ud, td, ws, opts, slo, budget,
                kvbpt, cpu_kv, rng)
            estim["deployable"] += e1[0] * n_auto
            estim["modelled_only"] += (e1[1] - e1[0]) * n_auto
            cands += rec_list
            cloud += cl
        for k in ("deployable", "modelled_only"):
            bounds[k] = int(bounds[k])
            estim[k] = int(estim[k])
        bounds["total"] = bounds["deployable"] + bounds["modelled_only"]
        estim["total"] = estim["deployable"] + estim["modelled_only"]
        self.counts["bounds"] = bounds
        self.counts["estimate"] = estim
        allc = np.concatenate(cands) if cands else cand_array(0)
        self.candidates = allc[np.lexsort((score(allc, slo), allc["cost"]))]
        self.cloud = np.concatenate(cloud) if cloud else cand_array(0)
        self.timings["analytic_s"] = time.perf_counter() - t0

    # -- candidates to plans --------------------------------------------------------------
    def to_plan(self, rec) -> Plan:
        space, grid = self.space, self.grid
        layout = "colocated" if rec["layout"] == 0 else "disaggregated"
        u = self.tables["colocated" if layout == "colocated" else "decode"][0]
        du, dr, o = int(rec["du"]), int(rec["dr"]), int(rec["o"])
        e = int(u.e[du])
        dev = self.devices[int(u.dev[du])]
        decode = PoolPlan(dev.index, dev.sim_key, int(u.tp[du]), dr,
                          PoolEngine(int(grid.seqs[e]), int(grid.budget[e]), float(u.kv_gib[du])),
                          dev.cpu, dev.threads)
        prefill = None
        if layout == "disaggregated":
            up = self.tables["prefill"][0]
            pu, pr = int(rec["pu"]), int(rec["pr"])
            pdev = self.devices[int(up.dev[pu])]
            chunk = int(up.budget[pu])
            prefill = PoolPlan(pdev.index, pdev.sim_key, int(up.tp[pu]), pr,
                               PoolEngine(self.prefill_max_num_seqs(chunk), chunk,
                                          float(up.kv_gib[pu])), pdev.cpu, pdev.threads)
        opt = self.tables["colocated" if layout == "colocated" else "decode"][1][o]
        engine = EnginePlan(int(grid.block[e]), space.kv_dtypes[grid.kv[e]],
                            space.weight_dtypes[grid.wd[e]], space.speculative[grid.spec[e]])
        plan = Plan(layout, decode, prefill, engine, opt.policy, opt.local_prefill_max_tokens,
                    "fixed", bool(rec["dep"]))
        return replace(plan, predicted=self.predict(plan))

    def prefill_max_num_seqs(self, chunk: int) -> int:
        """A prefill pool's batch cap: enough prompts to fill a ``chunk``-token
        step with the workload's short prompts (its 5th percentile of uncached
        tokens), so the step budget binds, as the estimate's full-step rate assumes."""
        return max(1, min(chunk, math.ceil(chunk / self._short_prompt)))

    def _unit(self, table: str, pool: PoolPlan, e: int) -> int | None:
        u = self.tables[table][0]
        hit = np.flatnonzero((u.dev == pool.device) & (u.tp == pool.tp) & (u.e == e))
        return int(hit[0]) if len(hit) else None

    def _grid_rows(self, plan: Plan) -> tuple[int | None, int | None]:
        """The engine grid rows of ``plan``'s decode (or colocated) pool and of
        its prefill pool (the row standing for its prefill setting)."""
        g, sp, engine = self.grid, self.space, plan.engine
        try:
            kv, wd = sp.kv_dtypes.index(engine.kv_cache_dtype), sp.weight_dtypes.index(
                engine.weight_dtype)
            spec = sp.speculative.index(engine.speculative)
        except ValueError:
            return None, None
        shared = (g.block == engine.block_size) & (g.kv == kv) & (g.wd == wd)
        d = plan.decode.engine
        hit = np.flatnonzero(shared & (g.seqs == d.max_num_seqs)
                             & (g.budget == d.max_num_batched_tokens) & (g.spec == spec))
        e = int(hit[0]) if len(hit) else None
        if plan.prefill is None:
            return e, None
        hit = np.flatnonzero(shared & (g.budget == plan.prefill.engine.max_num_batched_tokens))
        if not len(hit):
            return e, None
        # the row standing for that prefill setting: the first of its prefill_key
        return e, int(np.flatnonzero(g.prefill_key == g.prefill_key[hit[0]])[0])

    def predict(self, plan: Plan) -> dict:
        """The estimator's figures for ``plan`` (from the tables: any replica
        count up to the offers'); empty when the plan lies outside the space."""
        slo = self.req.slo
        e, e_pre = self._grid_rows(plan)
        table = "colocated" if plan.layout == "colocated" else "decode"
        if e is None or table not in self.tables:
            return {}
        u, opts, ws, t = self.tables[table]
        try:
            o = next(i for i, x in enumerate(opts) if x.policy == plan.policy and (
                plan.layout == "colocated" or x.local_prefill_max_tokens
                == plan.local_prefill_max_tokens))
        except StopIteration:
            return {}
        du = self._unit(table, plan.decode, e)
        rmax = t.shape[2]
        if du is None or plan.decode.replicas > rmax:
            return {}
        m = t.metrics
        at = (du, o, plan.decode.replicas - 1)
        pools = {("colocated" if plan.layout == "colocated" else "decode"): {
            "busy_step_s": float(m["tau"][at]), "running": float(m["n"][at]),
            "slots": float(m["slots"][at]), "seq_fraction": float(m["n"][at] / u.seqs[du]),
            "kv_usage": float(m["kv_use"][at]), "tpot_p": float(m["tpot_p"][at]),
            "blocking": float(m["blocking"][at]),
            "memory_bound": bool(m["memory_bound"][at]),
            "fitted": fitted(u, du),
            "prompt_utilization": float(m["prefill_rho"][at]),
            "tokens_per_step": float(m["tokens"][at])}}
        ttft = float(m["ttft_local"][at])
        tpot = float(m["tpot_p"][at])
        ok = bool(t.est_ok[at])
        if plan.layout == "disaggregated":
            up, _, _, tpre = self.tables["prefill"]
            pu = None if e_pre is None else self._unit("prefill", plan.prefill, e_pre)
            if pu is None or plan.prefill.replicas > rmax:
                return {}
            mp = tpre.metrics
            pat = (pu, o, plan.prefill.replicas - 1)
            pools["prefill"] = {"ttft_p": float(mp["ttft_p"][pat]), "busy": float(mp["rho"][pat]),
                                "tokens_per_s": float(mp["mu"][pat]),
                                "full_step_memory_bound": bool(mp["full_step_memory_bound"][pat]),
                                "fitted": fitted(up, pu)}
            ok = ok and bool(tpre.est_ok[pat])
            if ws.rem_n[o, pat[2]] >= 1 - slo.ttft_pct / 100:
                dev_p, dev_d = self.devices[plan.prefill.device], self.devices[plan.decode.device]
                kv = self.req.shape.kv_bytes_per_token(
                    "fp8" if plan.engine.kv_cache_dtype == "fp8" else
                    ("float32" if dev_p.cpu else "bfloat16"))
                same = dev_p.index == dev_d.index and plan.devices <= est.DEVICES_PER_NODE
                bw = dev_p.hw.intra_node_bandwidth if same else 4 * min(
                    dev_p.hw.network_bandwidth * dev_p.hw.efficiency.network,
                    dev_d.hw.network_bandwidth * dev_d.hw.efficiency.network)
                remote = (float(mp["ttft_p"][pat]) + float(ws.rem_ip[o, pat[2]]) * kv / bw
                          + float(m["tau"][at]) + 4 * est.RPC_S)
                ttft = max(ttft, remote)
        q = float(self.quality[e])
        return {"ttft_p": ttft, "tpot_p": tpot, "peak_cost_per_hour": self.peak_cost(plan),
                "pools": pools, "ppl_increase": None if math.isnan(q) else q,
                "predicted_within_slo": ok and ttft <= slo.ttft_s and tpot <= slo.tpot_s}

    def enumerate_plans(self, limit: int = 5000) -> list[Plan]:
        """Every deployable combination of the space (fixed size), for checking
        the search against exhaustive simulation on small spaces."""
        out: list[Plan] = []
        grid, space = self.grid, self.space
        for layout in space.layouts:
            table = "colocated" if layout == "colocated" else "decode"
            u, opts, _, t = self.tables[table]
            up = self.tables["prefill"][0] if layout == "disaggregated" else None
            for du in np.flatnonzero(u.deployable & u.mem_ok):
                e = int(u.e[du])
                pus = [None] if up is None else [
                    i for i in np.flatnonzero(up.deployable & up.mem_ok)
                    if grid.shared_key[up.e[i]] == grid.shared_key[e]]
                for o, opt in enumerate(opts):
                    for pu in pus:
                        for dr in range(1, int(u.cap[du]) + 1):
                            for pr in ([0] if pu is None else range(1, int(up.cap[pu]) + 1)):
                                rec = cand_array(1)[0]
                                rec["layout"] = 0 if layout == "colocated" else 1
                                rec["du"], rec["dr"], rec["o"] = du, dr, o
                                rec["pu"], rec["pr"] = (-1, 0) if pu is None else (pu, pr)
                                rec["dep"] = True
                                rec["q"] = self.quality[e]
                                plan = self.to_plan(rec)
                                if self.fits(plan):
                                    out.append(plan)
                                    if len(out) > limit:
                                        raise PlanInputError(f"more than {limit} combinations")
        return out

    def mean_cost(self, plan: Plan, mode: str | None = None) -> float:
        """$/hour averaged over the workload's rate curve, for an autoscaling mode."""
        mode = mode or plan.autoscaling
        curve = self.req.workload.curve
        total = 0.0
        for _, p in plan.pools:
            price = self.devices[p.device].price * p.tp
            if mode == "scale-down" and not self.req.workload.steady:
                low = max(1, math.ceil(p.replicas * float(curve.min())))
                reps = np.clip(np.ceil(p.replicas * curve), low, p.replicas)
                total += price * float(reps.mean())
            else:
                total += price * p.replicas
        return total

    def with_autoscaling(self, plan: Plan) -> Plan:
        """The variant the workload calls for: scale down in troughs when the
        rate varies (cheapest over the curve), else a fixed size."""
        modes = [m for m in self.space.autoscaling]
        if not modes:
            return plan
        best = min(modes, key=lambda m: (self.mean_cost(plan, m), m != "fixed"))
        return replace(plan, autoscaling=best)

    def peak_cost(self, plan: Plan) -> float:
        return sum(self.devices[p.device].price * p.tp * p.replicas for _, p in plan.pools)

    def fits(self, plan: Plan) -> bool:
        use: dict[int, int] = {}
        for _, p in plan.pools:
            if not 1 <= p.replicas <= self.space.max_replicas:
                return False
            use[p.device] = use.get(p.device, 0) + p.replicas * p.tp
        if any(n > self.devices[d].count for d, n in use.items()):
            return False
        if self.req.budget_per_hour is not None and self.peak_cost(plan) > self.req.budget_per_hour:
            return False
        return True

    # -- stage 4 ----------------------------------------------------------------------------
    def finalists(self) -> list[Plan]:
        """The cheapest distinct hardware allocations among the deployable
        candidates, best-predicted settings for each; a share kept for each layout."""
        F = self.req.finalists
        cand = self.candidates[self.candidates["dep"]]
        picked: dict[tuple, object] = {}
        per_layout: dict[int, int] = {}
        layouts = sorted(set(int(x) for x in cand["layout"]))
        quota = {lay: max(2, F // max(1, len(layouts))) for lay in layouts}
        u_col = self.tables.get("colocated", (None,))[0]
        ud = self.tables.get("decode", (None,))[0]
        up = self.tables.get("prefill", (None,))[0]
        for rec in cand:
            lay = int(rec["layout"])
            units = u_col if lay == 0 else ud
            du = int(rec["du"])
            key = (lay, int(units.dev[du]), int(units.tp[du]), int(rec["dr"]))
            if lay == 1:
                pu = int(rec["pu"])
                key += (int(up.dev[pu]), int(up.tp[pu]), int(rec["pr"]))
            if key in picked:
                continue
            if per_layout.get(lay, 0) >= quota[lay]:
                if all(per_layout.get(x, 0) >= quota[x] for x in layouts):
                    break
                continue
            picked[key] = rec
            per_layout[lay] = per_layout.get(lay, 0) + 1
        plans = [self.with_autoscaling(self.to_plan(r)) for r in picked.values()]
        return sorted(plans, key=lambda p: (self.mean_cost(p), p.predicted["ttft_p"]))

    def simulate(self, plan: Plan, cfg=None) -> SimOutcome:
        """Run ``plan`` (or an operator config given as ``cfg``, described by
        ``plan``) on the workload's simulated window."""
        from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation

        req = self.req
        wl = req.workload
        given = cfg is not None
        cfg = cfg if given else to_config(plan, self.emit_ctx)
        roles = {role: p.hardware for role, p in plan.pools}

        def hardware(model: str, role: str) -> str:
            return roles.get(role, plan.decode.hardware)

        tail = float(np.percentile(wl.outputs, 99)) * req.slo.tpot_s * 3 + req.slo.ttft_s * 3
        opts = SimOptions(seed=req.seed, drain_s=max(30.0, tail), kv_block_scale=req.kv_block_scale,
                          sample_s=5.0)
        t0 = time.perf_counter()
        sim = Simulation(cfg, {cfg.models[0].model.name: req.shape}, hardware, self.db,
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
        peak = self.peak_cost(plan)
        mean_cost = self.mean_cost(plan)
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

    def _neighbour(self, plan: Plan, role: str, delta: int) -> Plan | None:
        pools = dict(plan.pools)
        p = pools[role]
        new = replace(p, replicas=p.replicas + delta)
        cand = replace(plan, decode=new) if role in ("decode", "colocated") else replace(
            plan, prefill=new)
        if not self.fits(cand):
            return None
        return replace(cand, predicted={**self.predict(cand), "derived_from": plan.label()})

    def search(self) -> PlanResult:
        start = time.perf_counter()
        self.analytic()
        t0 = time.perf_counter()
        req = self.req
        queue = self.finalists()
        self.counts["finalists"] = len(queue)
        done: dict[tuple, SimOutcome] = {}
        outcomes: list[SimOutcome] = []

        def run(plan: Plan) -> SimOutcome | None:
            k = plan.key()
            if k in done:
                return done[k]
            if len(done) >= req.max_sims or time.perf_counter() - start > req.time_budget_s:
                return None
            self.log(f"  simulating {plan.label()}")
            out = self.simulate(plan)
            done[k] = out
            outcomes.append(out)
            self.log(f"    TTFT p{req.slo.ttft_pct:g} {out.ttft_p * 1e3:.0f} ms, TPOT "
                     f"p{req.slo.tpot_pct:g} {out.tpot_p * 1e3:.1f} ms, "
                     f"{'meets' if out.meets else 'misses ' + out.why}, ${out.cost_per_hour:.2f}/h "
                     f"({out.wall_s:.1f}s)")
            return out

        def met_cost(layout: str) -> float:
            return min((o.cost_per_hour for o in outcomes if o.meets and o.plan.layout == layout),
                       default=math.inf)

        def explore(pending: list[Plan], dearer: float) -> bool:
            """Simulate ``pending`` cheapest first; a miss is repaired (a replica
            more where it missed, up to 3 in a row). False when out of budget."""
            pending = sorted(pending, key=self.mean_cost)
            while pending:
                plan = pending.pop(0)
                depth = plan.predicted.get("repairs", 0)
                if self.mean_cost(plan) > met_cost(plan.layout) * (1.0 if depth else dearer):
                    continue  # dearer than a plan of its layout already meeting the SLOs
                out = run(plan)
                if out is None:
                    return False
                if out.meets or depth >= 3:
                    continue
                for role in self._repair_roles(plan, out):
                    fix = self._neighbour(plan, role, +1)
                    if fix is not None and fix.key() not in done:
                        pending.append(replace(fix, predicted={**fix.predicted,
                                                               "repairs": depth + 1}))
                pending.sort(key=self.mean_cost)
            return True

        # 1. the finalists (dearer ones still run while within 1.5x: the front's faster end)
        if explore(list(queue), 1.5):
            # 2. the estimate calibrated on what was simulated: the cheaper allocations it
            # now expects within the SLOs
            extra = self._calibrated(outcomes, {k for k in done}, met_cost)
            self.counts["calibrated"] = len(extra)
            explore(extra, 1.0)
        # trim the winners of each layout: a replica less while the SLOs still hold
        for lay in ("disaggregated", "colocated"):
            ok = [o for o in outcomes if o.meets and o.plan.layout == lay]
            if not ok:
                continue
            cur = min(ok, key=lambda o: o.cost_per_hour)
            improved = True
            while improved:
                improved = False
                for role, _ in cur.plan.pools:
                    cand = self._neighbour(cur.plan, role, -1)
                    if cand is None:
                        continue
                    out = run(cand)
                    if out is not None and out.meets and out.cost_per_hour < cur.cost_per_hour:
                        cur, improved = out, True
                        break
        self.timings["simulation_s"] = time.perf_counter() - t0
        self.counts["simulated"] = len(outcomes)
        self.counts["simulated_meeting_slo"] = sum(o.meets for o in outcomes)
        slo = req.slo

        def _rank(o: SimOutcome):
            return (round(o.cost_per_hour, 6), max(o.ttft_p / slo.ttft_s, o.tpot_p / slo.tpot_s),
                    o.plan.devices)

        good = [o for o in outcomes if o.meets and self._quality_ok(o.plan)]
        chosen = min(good, key=_rank) if good else None
        col = [o for o in good if o.plan.layout == "colocated"]
        modelled = [r for r in self.candidates if not r["dep"] and r["ok"]]
        best_mod = self.to_plan(modelled[0]) if modelled else None
        dep_ok = [r for r in self.candidates if r["dep"] and r["ok"]]
        best_dep = self.to_plan(dep_ok[0]) if dep_ok else None
        return PlanResult(req, self.devices, self.counts, self.timings, outcomes, chosen,
                          min(col, key=_rank) if col else None, best_mod, best_dep,
                          {"cost": self.cloud["cost"], "score": score(self.cloud, req.slo),
                           "layout": self.cloud["layout"], "dep": self.cloud["dep"]},
                          self.emit_ctx, self._forms_summary())

    def _repair_roles(self, plan: Plan, out: SimOutcome) -> list[str]:
        """Where a replica more may fix a miss: TPOT or refused requests are the
        decode pool's; TTFT is the prefill pool's first, and the decode pool's
        (its first step and batch slots are part of TTFT)."""
        if plan.layout == "colocated":
            return ["colocated"]
        errors = sum(out.summary.get("errors", {}).values())
        if "tpot" in out.why or errors:
            return ["decode"]
        return ["prefill", "decode"]

    def _calibrated(self, outcomes: list[SimOutcome], done: set, met_cost) -> list[Plan]:
        """Cheaper allocations than any simulated plan meeting the SLOs that the
        estimate, scaled by its median error on the simulated plans of each
        layout, expects within the SLOs."""
        slo = self.req.slo
        ratios = {}
        for lay in (0, 1):
            name = "colocated" if lay == 0 else "disaggregated"
            pairs = [(o.ttft_p / o.plan.predicted["ttft_p"], o.tpot_p / o.plan.predicted["tpot_p"])
                     for o in outcomes if o.plan.layout == name and math.isfinite(o.ttft_p)
                     and math.isfinite(o.tpot_p) and o.plan.predicted.get("ttft_p", 0) > 0
                     and o.plan.predicted.get("tpot_p", 0) > 0]
            if pairs:
                ratios[lay] = (float(np.median([p[0] for p in pairs])),
                               float(np.median([p[1] for p in pairs])))
        cand = self.candidates[self.candidates["dep"]]
        out: list[Plan] = []
        seen = set()
        for rec in cand:
            lay = int(rec["layout"])
            if lay not in ratios:
                continue
            rt, rp = ratios[lay]
            if rec["ttft"] * rt > slo.ttft_s or rec["tpot"] * rp > slo.tpot_s:
                continue
            plan = self.with_autoscaling(self.to_plan(rec))
            alloc = plan.alloc()
            if alloc in seen or self.mean_cost(plan) >= met_cost(plan.layout):
                continue
            seen.add(alloc)
            if plan.key() in done:
                continue
            out.append(plan)
            if len(out) >= max(2, self.req.finalists // 2):
                break
        return out

    def _quality_ok(self, plan: Plan) -> bool:
        floor = self.req.max_ppl_increase
        if floor is None:
            return True
        q = plan.predicted.get("ppl_increase")
        return q is not None and q <= floor + 1e-12

    def _forms_summary(self) -> dict:
        out = {}
        for (di, tp, wd, kv), (_, _, prov, desc, _) in self.forms._cache.items():
            out[f"{self.devices[di].label} tp{tp} {wd} kv-{kv}"] = {"provenance": prov,
                                                                     "model": desc}
        return out
