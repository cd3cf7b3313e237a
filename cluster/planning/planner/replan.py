"""Re-planning: the running cluster's config against the observed workload.

``splitserve plan --current FILE --observed BENCH.json`` simulates the
current config on what the cluster was observed to serve, plans afresh for
that workload (keeping the current file's other keys), and proposes the
new config when it meets the SLOs the current one misses, or meets them
for less; the proposal is shown as a diff of the YAML.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import yaml

from splitserve.cluster.config import ClusterConfig, config_changes, parse_config
from splitserve.cluster.planning.planner.emit import EnginePlan, Plan, PoolEngine, PoolPlan
from splitserve.engine.roles import Role


def plan_from_config(cfg: ClusterConfig, device) -> Plan:
    """The current config as a plan on ``device`` (the first served model)."""
    served = cfg.models[0]
    m = served.model

    def pool(role: Role) -> PoolPlan:
        spec, run = served.pool(role), served.engine_spec(role)  # each pool's own settings
        n = spec.initial_replicas if spec.initial_replicas is not None else spec.min_replicas
        tp = 1 if device.cpu else run.tensor_parallel_size * max(1, math.ceil(spec.num_gpus))
        engine = PoolEngine(run.max_num_seqs, run.max_num_batched_tokens, run.kv_cache_memory_gb)
        return PoolPlan(device.index, device.sim_key, tp, max(1, n), engine, device.cpu,
                        max(1, int(spec.num_cpus)) if device.cpu else 1)

    auto = served.decode.autoscaling is not None or (
        served.mode == "disaggregated" and served.prefill.autoscaling is not None)
    mode = "fixed"
    if auto:
        d = served.decode
        mode = "burst" if (d.initial_replicas or d.min_replicas) < d.max_replicas and (
            d.initial_replicas is None) else "scale-down"
    spec = m.speculative
    engine = EnginePlan(m.block_size, m.kv_cache_dtype,
                        "fp8" if m.weight_dtype == "fp8" else "bfloat16",
                        "off" if spec is None else f"{spec.method}:{spec.num_speculative_tokens}")
    colocated = served.mode == "colocated"
    return Plan(served.mode, pool(Role.COLOCATED if colocated else Role.DECODE),
                None if colocated else pool(Role.PREFILL), engine,
                cfg.router.policy, cfg.router.local_prefill_max_tokens, mode, True,
                {"current": True})


@dataclass
class Proposal:
    change: bool
    reason: str
    changes: list[str]
    diff: str


def propose(current_cfg: ClusterConfig, current_yaml: str, current, chosen, new_yaml: str | None,
            current_path: str = "current.yaml") -> Proposal:
    """Whether to move from ``current`` (its simulated outcome) to ``chosen``."""
    if chosen is None or new_yaml is None:
        return Proposal(False, "no plan meets the SLOs on the observed workload within the "
                               "offers; keeping the current config", [], "")
    saving = 1 - chosen.cost_per_hour / current.cost_per_hour if current.cost_per_hour else 0.0
    if current.meets and saving <= 0.01:
        return Proposal(False, f"the current config meets the SLOs on the observed workload "
                               f"(${current.cost_per_hour:.2f}/h) and no plan is cheaper by more "
                               "than 1%; no change", [], "")
    if not current.meets:
        reason = (f"the current config misses the {current.why.upper()} SLO on the observed "
                  f"workload in simulation; the plan meets both at "
                  f"${chosen.cost_per_hour:.2f}/h (current ${current.cost_per_hour:.2f}/h)")
    else:
        reason = (f"the plan meets the SLOs for ${chosen.cost_per_hour:.2f}/h instead of "
                  f"${current.cost_per_hour:.2f}/h ({saving:.0%} less)")
    new_cfg = parse_config(yaml.safe_load(new_yaml), "plan")
    changes = config_changes(current_cfg, new_cfg)
    diff = "".join(difflib.unified_diff(
        _canonical(current_cfg).splitlines(True), _canonical(new_cfg).splitlines(True),
        fromfile=f"{current_path} (current)", tofile="plan.yaml (proposed)", n=2))
    return Proposal(True, reason, changes, diff)


def _canonical(cfg: ClusterConfig) -> str:
    """Both files with every default filled in, so the diff shows values, not layout."""
    data = cfg.model_dump(mode="json")
    if data.get("auth", {}).get("cluster_token"):
        data["auth"]["cluster_token"] = "<secret>"
    return yaml.safe_dump(data, sort_keys=False)
