"""The planner against exhaustive simulation: on spaces small enough to
simulate every combination, how much more does the planner's choice cost
than the cheapest combination the simulator finds within the same SLOs?
(Target: within 5%.)

Llama-3.1-8B on derived profiles of two GPU kinds, three workloads (chat:
short prompts and long outputs; RAG: long prompts and short outputs; code
completion: a tight TTFT). Space per workload: both layouts, up to
``--max-replicas`` replicas per pool, two batch caps, two chunk sizes, the
cost policy with and without local prefill, fixed sizes. Every combination
is simulated on the same requests as the planner's own simulations.

    python benchmarks/plan_accuracy.py --out bench-results/plan-accuracy.json
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
from splitserve.cluster.planning.planner.inputs import SLO, Offer, synthetic_workload  # noqa: E402
from splitserve.cluster.planning.planner.request import PlanRequest  # noqa: E402
from splitserve.cluster.planning.planner.search import Planner  # noqa: E402
from splitserve.cluster.planning.planner.space import SpaceSpec  # noqa: E402
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402

WORKLOADS = {
    "chat": dict(rate=30, input_len="lognormal:5.5:0.7:16:4000",
                 output_len="lognormal:5.8:0.6:16:2000", slo=SLO(0.5, 0.025)),
    "rag": dict(rate=6, input_len="lognormal:8.0:0.4:512:12000",
                output_len="lognormal:4.3:0.5:4:400", slo=SLO(1.5, 0.04)),
    "code": dict(rate=24, input_len="lognormal:6.8:0.5:64:6000",
                 output_len="lognormal:3.5:0.6:4:256", slo=SLO(0.15, 0.05)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="chat,rag,code")
    ap.add_argument("--hardware", nargs="+", default=["l40s:6", "a100-80gb:6"])
    ap.add_argument("--max-replicas", type=int, default=5)
    ap.add_argument("--sim-requests", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))
    space = SpaceSpec(max_num_seqs=(64, 256), max_num_batched_tokens=(512, 2048),
                      block_sizes=(16,), kv_dtypes=("auto",), weight_dtypes=("bfloat16",),
                      tensor_parallel=(1,), speculative=("off",), policies=("cost",),
                      local_prefill=(0, 512), autoscaling=("fixed",),
                      max_replicas=args.max_replicas)
    offers = [Offer(h.split(":")[0], int(h.split(":")[1])) for h in args.hardware]
    rows = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        wl = synthetic_workload(w["rate"], parse_length_dist(w["input_len"]),
                                parse_length_dist(w["output_len"]), window=args.sim_requests,
                                seed=args.seed)
        req = PlanRequest(PRESETS["llama-3.1-8b"], "llama", "/models/llama", wl, w["slo"], offers,
                          space=space, seed=args.seed, finalists=8, max_sims=20)
        planner = Planner(req, db)
        t0 = time.perf_counter()
        res = planner.search()
        plan_s = time.perf_counter() - t0
        plans = planner.enumerate_plans()
        t1 = time.perf_counter()
        outs = [planner.simulate(p) for p in plans]
        exhaustive_s = time.perf_counter() - t1
        ok = [o for o in outs if o.meets]
        best = min(ok, key=lambda o: o.cost_per_hour) if ok else None
        chosen = res.chosen
        excess = (chosen.cost_per_hour / best.cost_per_hour - 1) if chosen and best else None
        row = {"workload": name, "rate": w["rate"], "slo": w["slo"].describe(),
               "combinations": len(plans), "meeting_slo": len(ok),
               "exhaustive_best": best.plan.label() if best else None,
               "exhaustive_best_cost": best.cost_per_hour if best else None,
               "chosen": chosen.plan.label() if chosen else None,
               "chosen_cost": chosen.cost_per_hour if chosen else None,
               "excess_cost": excess, "planner_simulations": res.counts["simulated"],
               "planner_s": plan_s, "exhaustive_s": exhaustive_s}
        rows.append(row)
        print(f"{name}: {len(plans)} combinations, {len(ok)} meet the SLOs; exhaustive best "
              f"{row['exhaustive_best']} ${row['exhaustive_best_cost'] or 0:.2f}/h; planner "
              f"{row['chosen']} ${row['chosen_cost'] or 0:.2f}/h "
              f"({'n/a' if excess is None else f'{excess:+.1%}'}) after "
              f"{row['planner_simulations']} simulations in {plan_s:.0f} s "
              f"(exhaustive: {exhaustive_s:.0f} s)", flush=True)
    rec = {**record_header("plan-accuracy"), "args": vars(args),
           "profile": "derived: roofline of llama-3.1-8b on datasheet figures x the efficiency "
                      "model of cluster/planning/catalog.yaml", "workloads": rows}
    if args.out:
        write_json(args.out, rec, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
