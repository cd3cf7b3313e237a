"""How long ``splitserve plan`` takes for a realistic request, and how many
combinations each stage keeps.

Llama-3.1-8B, a chat-like workload (lognormal prompts ~700 tokens, outputs
~150) at 30 req/s, TTFT p90 <= 1 s and TPOT p90 <= 40 ms, three GPU kinds
on offer (H100 SXM, A100 80GB, L40S; 16 of each, derived profiles), the
default search space (deployable and modelled-only values). Runs the plan
``--repeats`` times and reports wall and CPU seconds per stage with this
machine's load average before and after (the machine is shared).

    python benchmarks/plan_speed.py --repeats 3 --out bench-results/plan-speed.json
"""

from __future__ import annotations

import argparse
import json
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
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402


def one(db, args) -> dict:
    wl = synthetic_workload(args.rate, parse_length_dist(args.input_len),
                            parse_length_dist(args.output_len), window=args.sim_requests,
                            seed=args.seed)
    req = PlanRequest(PRESETS["llama-3.1-8b"], "llama-3.1-8b", "/models/llama-3.1-8b", wl,
                      SLO(args.ttft, args.tpot), [Offer(k, args.count) for k in args.hardware],
                      seed=args.seed)
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), time.process_time()
    res = Planner(req, db).search()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": os.getloadavg(),
            "timings": res.timings, "counts": res.counts,
            "chosen": None if res.chosen is None else res.chosen.plan.label(),
            "chosen_cost_per_hour": None if res.chosen is None else res.chosen.cost_per_hour}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--input-len", default="lognormal:6.5:0.7:16:8000")
    ap.add_argument("--output-len", default="lognormal:5.0:0.7:2:2000")
    ap.add_argument("--ttft", type=float, default=1.0)
    ap.add_argument("--tpot", type=float, default=0.04)
    ap.add_argument("--hardware", nargs="+", default=["h100-sxm", "a100-80gb", "l40s"])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--sim-requests", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))
    runs = []
    for k in range(args.repeats):
        r = one(db, args)
        runs.append(r)
        c = r["counts"]
        print(f"run {k + 1}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU (analytic "
              f"{r['timings']['analytic_s']:.1f} s, simulation {r['timings']['simulation_s']:.1f} s); "
              f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}; space "
              f"{c['space']['deployable']:,} deployable + {c['space']['modelled_only']:,} "
              f"modelled-only, bounds {c['bounds']['total']:,}, estimate {c['estimate']['total']:,}, "
              f"simulated {c['simulated']}; chosen {r['chosen']} "
              f"(${r['chosen_cost_per_hour'] or float('nan'):.2f}/h)", flush=True)
    rec = {**record_header("plan-speed"), "args": vars(args), "runs": runs,
           "wall_s": {"min": min(r["wall_s"] for r in runs), "max": max(r["wall_s"] for r in runs)}}
    print(json.dumps(rec["wall_s"]))
    if args.out:
        write_json(args.out, rec, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
