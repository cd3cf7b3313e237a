"""What ``splitserve plan`` is asked (``PlanRequest``) and what it answers:
each simulated plan's outcome (``SimOutcome``) and the search's result
(``PlanResult``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from splitserve.cluster.planning.planner.emit import EmitContext, Plan
from splitserve.cluster.planning.planner.inputs import SLO, Offer, WorkloadModel
from splitserve.cluster.planning.planner.space import SpaceSpec
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
    # the workload's kind for measured speculation acceptance (code-edit, free, a
    # dataset's name); None: the lowest measured (planning.acceptance.resolve)
    spec_workload: str | None = None

    def __post_init__(self) -> None:
        if self.shape.fp8_weights and self.space.weight_dtypes != ("fp8",):
            # an fp8 checkpoint serves in fp8 whatever the setting: one weight dtype to search
            self.space = dataclasses.replace(self.space, weight_dtypes=("fp8",))


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
    # speculation method -> the acceptance both stages used (planning.acceptance.Acceptance)
    acceptance: dict = field(default_factory=dict)
