"""What a plan costs and whether it fits the offers: dollars per hour at the
peak and averaged over the workload's rate curve for an autoscaling mode,
the mode the curve calls for, and the offers' device counts and budget."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from splitserve.cluster.planning.planner.context import PlanContext
from splitserve.cluster.planning.planner.emit import Plan


class Costing:
    def __init__(self, ctx: PlanContext):
        self.ctx = ctx

    def mean_cost(self, plan: Plan, mode: str | None = None) -> float:
        """$/hour averaged over the workload's rate curve, for an autoscaling mode."""
        mode = mode or plan.autoscaling
        curve = self.ctx.req.workload.curve
        total = 0.0
        for _, p in plan.pools:
            price = self.ctx.devices[p.device].price * p.tp
            if mode == "scale-down" and not self.ctx.req.workload.steady:
                low = max(1, math.ceil(p.replicas * float(curve.min())))
                reps = np.clip(np.ceil(p.replicas * curve), low, p.replicas)
                total += price * float(reps.mean())
            else:
                total += price * p.replicas
        return total

    def with_autoscaling(self, plan: Plan) -> Plan:
        """The variant the workload calls for: scale down in troughs when the
        rate varies (cheapest over the curve), else a fixed size."""
        modes = [m for m in self.ctx.space.autoscaling]
        if not modes:
            return plan
        best = min(modes, key=lambda m: (self.mean_cost(plan, m), m != "fixed"))
        return replace(plan, autoscaling=best)

    def peak_cost(self, plan: Plan) -> float:
        return sum(self.ctx.devices[p.device].price * p.tp * p.replicas for _, p in plan.pools)

    def fits(self, plan: Plan) -> bool:
        use: dict[int, int] = {}
        for _, p in plan.pools:
            if not 1 <= p.replicas <= self.ctx.space.max_replicas:
                return False
            use[p.device] = use.get(p.device, 0) + p.replicas * p.tp
        if any(n > self.ctx.devices[d].count for d, n in use.items()):
            return False
        if self.ctx.req.budget_per_hour is not None and self.peak_cost(plan) > self.ctx.req.budget_per_hour:
            return False
        return True
