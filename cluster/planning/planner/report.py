"""What ``splitserve plan`` prints and writes: the stage counts, the Pareto
front over quality, speed and cost as a table and a PNG, the explanation
of the choice, and a JSON record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from splitserve.cluster.planning.planner.request import PlanResult, SimOutcome


def _ms(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def quality_text(plan) -> str:
    q = plan.predicted.get("ppl_increase")
    e = plan.engine
    if e.kv_cache_dtype == "auto" and e.weight_dtype == "bfloat16":
        return "reference"
    return "unknown" if q is None else f"ppl +{q * 100:.2f}%"


def latency_score(o: SimOutcome, slo) -> float:
    return max(o.ttft_p / slo.ttft_s, o.tpot_p / slo.tpot_s)


def pareto(outcomes: list[SimOutcome], slo) -> list[SimOutcome]:
    """Simulated plans no other simulated plan beats on every axis: cost
    ($/hour over the workload), latency (the worse of TTFT and TPOT against
    their SLOs), goodput, and quality (perplexity increase; unknown counts as
    worst)."""
    def axes(o):
        q = o.plan.predicted.get("ppl_increase")
        return np.array([o.cost_per_hour, latency_score(o, slo), -o.goodput,
                         math.inf if q is None else q])
    pts = [axes(o) for o in outcomes]
    front = []
    for i, a in enumerate(pts):
        dominated = any(np.all(b <= a) and np.any(b < a) for j, b in enumerate(pts) if j != i)
        if not dominated:
            front.append(outcomes[i])
    return sorted(front, key=lambda o: (o.cost_per_hour, latency_score(o, slo)))


def table(outcomes: list[SimOutcome], slo, chosen: SimOutcome | None) -> str:
    head = ["", "layout", "pools (P:D)", "settings", "quality", f"TTFT p{slo.ttft_pct:g} ms",
            f"TPOT p{slo.tpot_pct:g} ms", "goodput req/s", "SLO att.", "$/h", "$/M out tok",
            "GPU-h/day", "meets"]
    rows = []
    for o in outcomes:
        p = o.plan
        e = p.engine
        pools = " + ".join(pp.size() for _, pp in p.pools)
        pool_settings = "; ".join(
            (f"chunk {pp.engine.max_num_batched_tokens}" if role == "prefill" else
             f"seqs {pp.engine.max_num_seqs}, chunk {pp.engine.max_num_batched_tokens}")
            for role, pp in p.pools)
        settings = (f"{pool_settings}, bs {e.block_size}, kv {e.kv_cache_dtype}, {p.policy}"
                    + (f"/local<={p.local_prefill_max_tokens}" if p.layout == "disaggregated"
                       and p.policy == "cost" else "") + f", {p.autoscaling}")
        rows.append(["*" if o is chosen else "", p.layout, f"{pools} ({p.ratio()})", settings,
                     quality_text(p), _ms(o.ttft_p), _ms(o.tpot_p),
                     f"{o.goodput:.2f}", f"{o.attainment:.1%}",
                     f"{o.cost_per_hour:.2f}", f"{o.usd_per_m_tokens:.3f}",
                     f"{o.gpu_hours_per_day:.0f}", "yes" if o.meets else f"no ({o.why})"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def counts_text(res: PlanResult) -> str:
    c = res.counts
    t = res.timings
    sp, b, e = c["space"], c["bounds"], c["estimate"]
    lines = [
        "stage                          deployable    modelled-only",
        f"search space                 {sp['deployable']:>12,}  {sp['modelled_only']:>15,}",
        f"after bounds                 {b['deployable']:>12,}  {b['modelled_only']:>15,}"
        "   (memory, latency floors, utilization < 1, network, offers, budget, quality)",
        f"estimate within SLOs         {e['deployable']:>12,}  {e['modelled_only']:>15,}"
        f"   (analytic, {t.get('analytic_s', 0):.1f} s)",
        f"simulated                    {c.get('simulated', 0):>12,}  {'-':>15}"
        f"   ({c.get('finalists', 0)} finalists, repairs and trims; "
        f"{c.get('simulated_meeting_slo', 0)} meet the SLOs; {t.get('simulation_s', 0):.1f} s)",
    ]
    return "\n".join(lines)


def explanation(res: PlanResult) -> list[str]:
    req = res.request
    slo = req.slo
    ch = res.chosen
    if ch is None:
        best = max(res.outcomes, key=lambda o: o.attainment, default=None)
        out = ["No simulated plan meets the SLOs within the offers and budget."]
        if best is not None:
            out.append(f"Closest: {best.plan.label()}: TTFT p{slo.ttft_pct:g} "
                       f"{_ms(best.ttft_p)} ms, TPOT p{slo.tpot_pct:g} {_ms(best.tpot_p)} ms "
                       f"({best.attainment:.0%} of requests within both).")
        out.append("Offer more devices, raise the budget, or relax an SLO.")
        return out
    p = ch.plan
    wl = req.workload
    lines = [
        f"Chosen: {p.layout}, " + ", ".join(
            f"{role} {pp.size()}" for role, pp in p.pools)
        + (f" (P:D = {p.ratio()})" if p.layout == "disaggregated" else "")
        + f"; ${ch.cost_per_hour:.2f}/hour, ${ch.usd_per_m_tokens:.3f} per million output tokens, "
          f"{ch.gpu_hours_per_day:.0f} device-hours a day.",
        f"In simulation at the peak rate ({wl.peak_rate:.1f} req/s, {len(wl.sim_requests)} "
        f"requests): TTFT p{slo.ttft_pct:g} {_ms(ch.ttft_p)} ms of {_ms(slo.ttft_s)}, TPOT "
        f"p{slo.tpot_pct:g} {_ms(ch.tpot_p)} ms of {_ms(slo.tpot_s)}, goodput "
        f"{ch.goodput:.2f} req/s ({ch.attainment:.1%} of requests after the warm-up within "
        "both).",
    ]
    pools = p.predicted.get("pools", {})
    for role, pp in p.pools:
        m = pools.get(role, {})
        if role == "prefill":
            bound = "memory-bandwidth" if m.get("full_step_memory_bound") else "compute"
            bound += "-bound"
            if m.get("fitted"):
                bound = "timed by the measured step fit"
            lines.append(
                f"Prefill pool ({pp.replicas} x {pp.hardware}): a full "
                f"{pp.engine.max_num_batched_tokens}-token step is {bound} "
                f"({m.get('tokens_per_s', 0):,.0f} prompt tokens/s per replica); estimated "
                f"{m.get('busy', 0):.0%} busy at the peak, so it is bound by TTFT (prompts "
                f"queueing), estimated p{slo.ttft_pct:g} {_ms(m.get('ttft_p', 0))} ms before "
                "the hand-off.")
        else:
            bound = ("memory-bandwidth" if m.get("memory_bound") else "compute") + "-bound"
            if m.get("fitted"):
                bound = "timed by the measured step fit"
            what = "decode" if role == "decode" else "colocated"
            limits = {"TPOT": m.get("tpot_p", 0) / slo.tpot_s,
                      "batch slots": m.get("running", 0) / max(m.get("slots", 1), 1),
                      "KV cache": m.get("kv_usage", 0)}
            if role == "colocated" or m.get("prompt_utilization", 0) > 0:
                limits["prompt work"] = min(m.get("prompt_utilization", 0), 9.9)
            tight = max(limits, key=limits.get)
            lines.append(
                f"{what.capitalize()} pool ({pp.replicas} x {pp.hardware}): steps are "
                f"{bound} (~{m.get('busy_step_s', 0) * 1e3:.1f} ms each, "
                f"{m.get('running', 0):.0f} sequences running of {m.get('slots', 0):.0f} slots, "
                f"KV {m.get('kv_usage', 0):.0%} used, estimated); closest limit: {tight} at "
                f"{limits[tight]:.0%}"
                + (" of its SLO" if tight == "TPOT" else "") + ".")
    # the neighbour with one replica less, if simulated
    for role, pp in p.pools:
        smaller = [o for o in res.outcomes if o.plan.layout == p.layout
                   and dict(o.plan.pools).get(role) is not None
                   and dict(o.plan.pools)[role].replicas == pp.replicas - 1
                   and all(dict(o.plan.pools)[r].replicas == q.replicas
                           for r, q in p.pools if r != role)
                   and o.plan.engine == p.engine
                   and all(dict(o.plan.pools)[r].engine == q.engine for r, q in p.pools)]
        if smaller:
            s = smaller[0]
            lines.append(f"One {role} replica fewer ({s.plan.ratio()}) "
                         + (f"misses the SLOs in simulation: TTFT p{slo.ttft_pct:g} "
                            f"{_ms(s.ttft_p)} ms, TPOT p{slo.tpot_pct:g} {_ms(s.tpot_p)} ms."
                            if not s.meets else "also meets them but was not chosen."))
    other = "colocated" if p.layout == "disaggregated" else "disaggregated"
    alt = [o for o in res.outcomes if o.meets and o.plan.layout == other]
    if alt:
        a = min(alt, key=lambda o: o.cost_per_hour)
        saving = 1 - ch.cost_per_hour / a.cost_per_hour if a.cost_per_hour else 0.0
        lines.append(f"Best {other} plan meeting the same SLOs in simulation: {a.plan.label()}, "
                     f"${a.cost_per_hour:.2f}/hour: the choice is {saving:.0%} cheaper.")
    else:
        lines.append(f"No {other} plan among those simulated met the SLOs.")
    spec = p.engine.speculative
    if spec != "off":
        acc = res.acceptance.get(spec.split(":")[0])
        k = pools.get("colocated" if p.layout == "colocated" else "decode", {}).get(
            "speculation_length")
        lines.append(f"Speculation {spec}: acceptance "
                     + (acc.describe() if acc is not None else "unknown")
                     + (f"; at the estimated batch the engine's length rule drafts {k}"
                        if k is not None else "") + ".")
    lines.append("Quality: " + ("the reference dtypes (bf16 weights and KV)" if quality_text(p)
                                == "reference" else quality_text(p)) + ".")
    if res.best_modelled is not None and res.best_deployable_estimate is not None:
        m, d = res.best_modelled, res.best_deployable_estimate
        mc, dc = m.predicted["peak_cost_per_hour"], d.predicted["peak_cost_per_hour"]
        if mc < dc:
            lines.append(f"Modelled only (not deployable today): {m.label()} is estimated at "
                         f"${mc:.2f}/hour at the peak, {1 - mc / dc:.0%} below the cheapest "
                         f"deployable estimate (${dc:.2f}).")
    return lines


def record(res: PlanResult, front: list[SimOutcome], yaml_text: str | None) -> dict:
    req = res.request
    return {
        "command": "splitserve plan", "model": req.model_name, "shape": req.shape.to_dict(),
        "workload": req.workload.summary(),
        "slo": {"ttft_s": req.slo.ttft_s, "ttft_pct": req.slo.ttft_pct, "tpot_s": req.slo.tpot_s,
                "tpot_pct": req.slo.tpot_pct},
        "max_ppl_increase": req.max_ppl_increase, "budget_per_hour": req.budget_per_hour,
        "hardware": [{"key": d.key, "offered": d.count, "price_per_hour": d.price,
                      "provenance": d.hw.provenance} for d in res.devices],
        "step_models": res.forms, "counts": res.counts, "timings": res.timings,
        "speculation_acceptance": {m: a.to_dict() for m, a in res.acceptance.items()},
        "simulated": [o.to_dict() for o in res.outcomes],
        "pareto": [o.plan.label() for o in front],
        "chosen": None if res.chosen is None else res.chosen.to_dict(),
        "explanation": res.explanation, "yaml": yaml_text,
    }


def write_json(rec: dict, path: Path) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x
    path.write_text(json.dumps(clean(rec), indent=1))


def plot(res: PlanResult, front: list[SimOutcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = res.request.slo
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    cl = res.cloud
    colors = {0: "tab:blue", 1: "tab:orange"}
    names = {0: "colocated", 1: "disaggregated"}
    if len(cl["cost"]):
        for lay in (0, 1):
            sel = (cl["layout"] == lay) & cl["dep"]
            if sel.any():
                ax1.scatter(cl["cost"][sel], np.minimum(cl["score"][sel], 5), s=4, alpha=0.15,
                            color=colors[lay], label=f"{names[lay]} (estimated)")
    for o in res.outcomes:
        lay = 0 if o.plan.layout == "colocated" else 1
        ls = min(latency_score(o, slo), 5)
        ax1.scatter([o.cost_per_hour], [ls], s=40, color=colors[lay],
                    facecolors=colors[lay] if o.meets else "none", edgecolors="black"
                    if o.meets else colors[lay], zorder=3)
        ax2.scatter([o.cost_per_hour], [o.goodput], s=40, color=colors[lay],
                    facecolors=colors[lay] if o.meets else "none", zorder=3,
                    marker="s" if o.plan.engine.kv_cache_dtype == "fp8" else "o")
    if front:
        ax1.plot([o.cost_per_hour for o in front], [min(latency_score(o, slo), 5) for o in front],
                 "k--", lw=1, label="Pareto front (simulated)")
    if res.chosen is not None:
        c = res.chosen
        ax1.scatter([c.cost_per_hour], [latency_score(c, slo)], marker="*", s=250, color="red",
                    zorder=4, label="chosen")
        ax2.scatter([c.cost_per_hour], [c.goodput], marker="*", s=250, color="red",
                    zorder=4, label="chosen")
    costs = [o.cost_per_hour for o in res.outcomes] + list(cl["cost"])
    if costs and min(costs) > 0 and max(costs) / min(costs) > 10:
        ax1.set_xscale("log")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("$ per hour (mean over the workload)")
    ax1.set_ylabel("latency / SLO (max of TTFT, TPOT at their percentiles)")
    ax1.set_title("cost vs speed (dots: estimate; circles: simulated, filled = meets SLOs)",
                  fontsize=9)
    ax1.legend(fontsize=7, loc="upper right")
    ax2.axhline(res.request.workload.peak_rate, color="grey", lw=0.8, label="offered rate")
    ax2.set_xlabel("$ per hour")
    ax2.set_ylabel("goodput (req/s within both SLOs)")
    ax2.set_title("goodput vs cost (squares: fp8 KV cache)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"splitserve plan: {res.request.model_name}, {slo.describe()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
