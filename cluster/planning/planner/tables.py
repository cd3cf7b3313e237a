"""The estimate's tables read back as plans: a candidate record as a
``Plan`` (each pool with its own engine settings), the estimator's figures
for any plan of the space (``predict``), and every deployable plan of a
small space (``enumerate_plans``, for checks against exhaustive simulation)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from splitserve.cluster.planning.planner.analytic import Table
from splitserve.cluster.planning.planner.candidates import cand_array, fitted
from splitserve.cluster.planning.planner.context import PlanContext
from splitserve.cluster.planning.planner.costing import Costing
from splitserve.cluster.planning.planner.devices import DEVICES_PER_NODE
from splitserve.cluster.planning.planner.emit import EnginePlan, Plan, PoolEngine, PoolPlan
from splitserve.cluster.planning.planner.estimate import RPC_S
from splitserve.cluster.planning.planner.inputs import PlanInputError


class PlanTables:
    def __init__(self, ctx: PlanContext, tables: dict[str, Table], costing: Costing):
        self.ctx = ctx
        self.tables = tables
        self.costing = costing

    def to_plan(self, rec) -> Plan:
        space, grid = self.ctx.space, self.ctx.grid
        layout = "colocated" if rec["layout"] == 0 else "disaggregated"
        u = self.tables["colocated" if layout == "colocated" else "decode"][0]
        du, dr, o = int(rec["du"]), int(rec["dr"]), int(rec["o"])
        e = int(u.e[du])
        dev = self.ctx.devices[int(u.dev[du])]
        decode = PoolPlan(dev.index, dev.sim_key, int(u.tp[du]), dr,
                          PoolEngine(int(grid.seqs[e]), int(grid.budget[e]), float(u.kv_gib[du])),
                          dev.cpu, dev.threads)
        prefill = None
        if layout == "disaggregated":
            up = self.tables["prefill"][0]
            pu, pr = int(rec["pu"]), int(rec["pr"])
            pdev = self.ctx.devices[int(up.dev[pu])]
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
        return max(1, min(chunk, math.ceil(chunk / self.ctx.short_prompt)))

    def _unit(self, table: str, pool: PoolPlan, e: int) -> int | None:
        u = self.tables[table][0]
        hit = np.flatnonzero((u.dev == pool.device) & (u.tp == pool.tp) & (u.e == e))
        return int(hit[0]) if len(hit) else None

    def _grid_rows(self, plan: Plan) -> tuple[int | None, int | None]:
        """The engine grid rows of ``plan``'s decode (or colocated) pool and of
        its prefill pool (the row standing for its prefill setting)."""
        g, sp, engine = self.ctx.grid, self.ctx.space, plan.engine
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
        slo = self.ctx.req.slo
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
            "tokens_per_step": float(m["tokens"][at]),
            "speculation_length": int(m["spec_k"][at])}}
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
                dev_p, dev_d = self.ctx.devices[plan.prefill.device], self.ctx.devices[plan.decode.device]
                shape = self.ctx.req.shape
                kv = shape.kv_bytes_per_token(
                    "fp8" if plan.engine.kv_cache_dtype == "fp8" else
                    ("float32" if dev_p.cpu else "bfloat16"))
                state = shape.state_bytes_per_sequence("float32" if dev_p.cpu else "bfloat16")
                same = dev_p.index == dev_d.index and plan.devices <= DEVICES_PER_NODE
                bw = dev_p.hw.intra_node_bandwidth if same else 4 * min(
                    dev_p.hw.network_bandwidth * dev_p.hw.efficiency.network,
                    dev_d.hw.network_bandwidth * dev_d.hw.efficiency.network)
                remote = (float(mp["ttft_p"][pat]) + (float(ws.rem_ip[o, pat[2]]) * kv + state) / bw
                          + float(m["tau"][at]) + 4 * RPC_S)
                ttft = max(ttft, remote)
        q = float(self.ctx.quality[e])
        return {"ttft_p": ttft, "tpot_p": tpot, "peak_cost_per_hour": self.costing.peak_cost(plan),
                "pools": pools, "ppl_increase": None if math.isnan(q) else q,
                "predicted_within_slo": ok and ttft <= slo.ttft_s and tpot <= slo.tpot_s}

    def enumerate_plans(self, limit: int = 5000) -> list[Plan]:
        """Every deployable combination of the space (fixed size), for checking
        the search against exhaustive simulation on small spaces."""
        out: list[Plan] = []
        grid, space = self.ctx.grid, self.ctx.space
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
                                rec["q"] = self.ctx.quality[e]
                                plan = self.to_plan(rec)
                                if self.costing.fits(plan):
                                    out.append(plan)
                                    if len(out) > limit:
                                        raise PlanInputError(f"more than {limit} combinations")
        return out
