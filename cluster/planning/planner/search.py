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

Stages 1-3 are ``analytic.py`` (over ``estimate.py`` and ``pairs.py``);
``tables.py`` reads their tables back as plans, ``simulate.py`` runs one,
``costing.py`` prices it. This module is stage 4: which plans to simulate.
"""


from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from splitserve.cluster.planning.db import ProfileDB
from splitserve.cluster.planning.planner.analytic import analytic
from splitserve.cluster.planning.planner.candidates import score
from splitserve.cluster.planning.planner.context import PlanContext
from splitserve.cluster.planning.planner.costing import Costing
from splitserve.cluster.planning.planner.devices import DEVICES_PER_NODE
from splitserve.cluster.planning.planner.emit import EmitContext, Plan
from splitserve.cluster.planning.planner.request import PlanRequest, PlanResult, SimOutcome
from splitserve.cluster.planning.planner.simulate import simulate
from splitserve.cluster.planning.planner.tables import PlanTables


class Planner:
    def __init__(self, req: PlanRequest, db: ProfileDB, log=lambda s: None):
        self.req = req
        self.db = db
        self.log = log
        self.ctx = PlanContext.build(req, db)
        self.devices = self.ctx.devices
        self.space = req.space
        self.grid = self.ctx.grid
        self.forms = self.ctx.forms
        self.quality_table = self.ctx.quality_table
        self.quality = self.ctx.quality
        self.costing = Costing(self.ctx)
        self.timings: dict[str, float] = {}
        self.counts: dict = {}
        wl = req.workload
        self.emit_ctx = EmitContext(
            model_name=req.model_name, model_path=req.model_path, ttft_s=req.slo.ttft_s,
            tpot_s=req.slo.tpot_s,
            trough=float(wl.curve.min()) if len(wl.curve) else 1.0,
            network_bytes_per_s=min(d.hw.network_bandwidth * d.hw.efficiency.network
                                    * (1 if d.cpu else DEVICES_PER_NODE)
                                    for d in self.devices),
            max_queue=max(256, int(4 * wl.peak_rate * (req.slo.ttft_s + float(
                np.mean(wl.outputs)) * req.slo.tpot_s)) + 16),
            base=req.base_config)

    # -- stages 1-3 (analytic.py), and their tables read back as plans (tables.py) ------
    def analytic(self) -> None:
        t0 = time.perf_counter()
        out = analytic(self.ctx)
        self.tables = out.tables
        self.candidates = out.candidates
        self.cloud = out.cloud
        self.counts.update(out.counts)
        self.plans = PlanTables(self.ctx, out.tables, self.costing)
        self.timings["analytic_s"] = time.perf_counter() - t0

    def to_plan(self, rec) -> Plan:
        return self.plans.to_plan(rec)

    def predict(self, plan: Plan) -> dict:
        return self.plans.predict(plan)

    def enumerate_plans(self, limit: int = 5000) -> list[Plan]:
        return self.plans.enumerate_plans(limit)

    def mean_cost(self, plan: Plan, mode: str | None = None) -> float:
        return self.costing.mean_cost(plan, mode)

    def with_autoscaling(self, plan: Plan) -> Plan:
        return self.costing.with_autoscaling(plan)

    def peak_cost(self, plan: Plan) -> float:
        return self.costing.peak_cost(plan)

    def fits(self, plan: Plan) -> bool:
        return self.costing.fits(plan)

    def simulate(self, plan: Plan, cfg=None) -> SimOutcome:
        """Run ``plan`` (or an operator config given as ``cfg``, described by
        ``plan``) on the workload's simulated window (simulate.py)."""
        return simulate(self.ctx, self.emit_ctx, self.costing, plan, cfg)

    # -- stage 4 ------------------------------------------------------------------------------
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
                          self.emit_ctx, self._forms_summary(),
                          acceptance=dict(self.ctx.acceptance))

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
        for (di, tp, wd, kv), (_, _, prov, desc, _, _) in self.forms._cache.items():
            out[f"{self.devices[di].label} tp{tp} {wd} kv-{kv}"] = {"provenance": prov,
                                                                     "model": desc}
        return out
