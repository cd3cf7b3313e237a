"""The worked examples of docs/planning.md: ``splitserve plan`` for three
Llama-3.1-8B workloads on derived GPU profiles, and how much cheaper the
choice is than the best colocated deployment meeting the same SLOs (a
second plan restricted to the colocated layout, with its own finalists,
repairs and trims).

- chat: short prompts (median ~250 tokens), long outputs (median ~400);
- rag: long prompts (median ~4,000), short outputs (median ~90); rag-tight:
  the same with TPOT p90 <= 25 ms instead of 50;
- code: code completion, prompts ~1,100 tokens, outputs ~33, tight TTFT.

Every figure is derived: roofline step times from datasheet peaks under the
efficiency model of cluster/planning/catalog.yaml, prices from its list.
Speculation acceptance: the database holds no measured rows for
Llama-3.1-8B, so the plans assume 0.7 (``acceptance.ASSUMED_ACCEPTANCE``)
and say so; ``--spec-acceptance RATE`` plans with another rate instead
(what a lower measured rate would change).

    python benchmarks/plan_examples.py --out bench-results/plan-examples.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitserve.cluster.bench.datasets import parse_length_dist  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.planner import report  # noqa: E402
from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload  # noqa: E402
from splitserve.cluster.planning.planner.request import PlanRequest  # noqa: E402
from splitserve.cluster.planning.planner.search import Planner  # noqa: E402
from splitserve.cluster.planning.planner.space import SpaceSpec  # noqa: E402
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402

EXAMPLES = {
    "chat": dict(rate=40, input_len="lognormal:5.5:0.7:16:4000",
                 output_len="lognormal:6.0:0.6:16:2000", slo=SLO(0.5, 0.03)),
    "rag": dict(rate=10, input_len="lognormal:8.3:0.4:512:16000",
                output_len="lognormal:4.5:0.5:4:512", slo=SLO(2.0, 0.05)),
    "rag-tight": dict(rate=10, input_len="lognormal:8.3:0.4:512:16000",
                      output_len="lognormal:4.5:0.5:4:512", slo=SLO(2.0, 0.025)),
    "code": dict(rate=40, input_len="lognormal:7.0:0.5:64:8000",
                 output_len="lognormal:3.5:0.6:4:256", slo=SLO(0.15, 0.05)),
}


def plan(db, ex, offers, layouts, args):
    wl = synthetic_workload(ex["rate"], parse_length_dist(ex["input_len"]),
                            parse_length_dist(ex["output_len"]), window=args.sim_requests,
                            seed=args.seed)
    req = PlanRequest(PRESETS["llama-3.1-8b"], "llama-3.1-8b", "/models/llama-3.1-8b", wl,
                      ex["slo"], offers, space=SpaceSpec(layouts=layouts,
                                                         spec_acceptance=args.spec_acceptance),
                      seed=args.seed,
                      max_sims=args.max_sims, time_budget_s=args.time_budget)
    t0 = time.perf_counter()
    res = Planner(req, db).search()
    res.timings["total_s"] = time.perf_counter() - t0
    res.explanation = report.explanation(res)
    return res


def summary(res) -> dict | None:
    c = res.chosen
    if c is None:
        return None
    return {"plan": c.plan.label(), "layout": c.plan.layout, "ratio": c.plan.ratio(),
            "speculative": c.plan.engine.speculative,
            "speculation_length": next(iter(
                p.get("speculation_length") for r, p in c.plan.predicted.get("pools", {}).items()
                if r != "prefill"), None),
            "acceptance": {m: a.describe() for m, a in res.acceptance.items()},
            "devices": c.plan.devices, "cost_per_hour": c.cost_per_hour,
            "usd_per_million_output_tokens": c.usd_per_m_tokens, "ttft_p90": c.ttft_p,
            "tpot_p90": c.tpot_p, "goodput": c.goodput, "slo_attainment": c.attainment}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="chat,rag,rag-tight,code")
    ap.add_argument("--hardware", nargs="+", default=["h100-sxm", "a100-80gb", "l40s"])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--sim-requests", type=int, default=800)
    ap.add_argument("--max-sims", type=int, default=30)
    ap.add_argument("--time-budget", type=float, default=600.0,
                    help="seconds of simulation per plan (the examples are about the choice, "
                         "benchmarks/plan_speed.py about the time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec-acceptance", type=float, default=None,
                    help="plan with this per-token acceptance instead of the assumed 0.7")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))
    offers = [Offer(k, args.count) for k in args.hardware]
    rows = []
    for name in args.examples.split(","):
        ex = EXAMPLES[name]
        full = plan(db, ex, offers, ("colocated", "disaggregated"), args)
        col = plan(db, ex, offers, ("colocated",), args)
        a, b = summary(full), summary(col)
        saving = (1 - a["cost_per_hour"] / b["cost_per_hour"]) if a and b else None
        rows.append({"example": name, "rate": ex["rate"], "input_len": ex["input_len"],
                     "output_len": ex["output_len"], "slo": ex["slo"].describe(),
                     "chosen": a, "best_colocated": b, "saving_vs_colocated": saving,
                     "counts": full.counts, "timings": full.timings,
                     "explanation": full.explanation})
        print(f"== {name}: {ex['rate']} req/s, {ex['slo'].describe()}")
        print(f"chosen: {a and a['plan']} ${a and a['cost_per_hour']:.2f}/h"
              + (f" (acceptance {a['acceptance']})" if a and a["speculative"] != "off" else ""))
        print(f"best colocated: {b and b['plan']} ${b and b['cost_per_hour']:.2f}/h")
        print(f"saving: {'n/a' if saving is None else f'{saving:.0%}'}; planned in "
              f"{full.timings['total_s']:.0f} s ({full.counts['space']['deployable']:,} deployable "
              f"combinations)")
        for line in full.explanation:
            print("  " + line)
        sys.stdout.flush()
    if args.out:
        write_json(args.out, {**record_header("plan-examples"),
                              "profile": "derived (datasheet x efficiency model of catalog.yaml)",
                              "spec_acceptance": args.spec_acceptance,
                              "examples": rows}, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
