"""A real plan on this machine: plan for a workload on the local CPU's
measured profile, deploy the chosen YAML on a local cluster, bench it with
the same workload, and put the measured TTFT, TPOT and goodput next to the
plan's prediction (its simulation), and next to a simulation of exactly
the requests the bench sent.

Steps (each a command a user would type):
1. ``splitserve profile --config deploy/configs/local.yaml --db DB --handoff``
   when the database has no measured profile of this CPU at one thread;
2. ``splitserve plan --hardware local:N --rate R ... --db DB --out OUT``;
3. ``splitserve serve --config OUT/plan.yaml`` (in the background);
4. ``splitserve bench --rates R --num-requests K ...`` against it;
5. the comparison, written to OUT/plan-vs-real.json and .md.

This is a long run (profiling, a cluster start, a bench): minutes at the
smallest scale, much longer at the default.

    python benchmarks/plan_vs_real.py --out bench-results/plan-vs-real           # default
    python benchmarks/plan_vs_real.py --replicas 2 --rate 0.5 --num-requests 20 \\
        --sim-requests 40 --fast-profile --out bench-results/plan-vs-real-small  # smallest
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitserve.cluster.bench.live import run_cli, serve_and_bench  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import local_cpu_key  # noqa: E402
from splitserve.cluster.planning.sim.replay import replay_bench_run  # noqa: E402


def ensure_profile(db_path: str, fast: bool) -> None:
    db = ProfileDB(db_path)
    key = local_cpu_key(1)
    if any(p["hardware_key"] == key for p in db.profiled()):
        return
    run_cli(["profile", "--config", str(ROOT / "deploy/configs/local.yaml"), "--db", db_path,
               "--handoff"] + (["--fast"] if fast else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3, help="local replicas on offer")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--input-len", default="uniform:64:256")
    ap.add_argument("--output-len", default="32")
    ap.add_argument("--ttft", default="2")
    ap.add_argument("--tpot", default="0.3")
    ap.add_argument("--num-requests", type=int, default=60, help="bench requests")
    ap.add_argument("--sim-requests", type=int, default=120, help="planner's simulated requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", default=None)
    ap.add_argument("--fast-profile", action="store_true",
                    help="profile with the small grid (seconds instead of minutes)")
    ap.add_argument("--out", default="bench-results/plan-vs-real")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db_path = args.db or str(out / "profiles.db")
    ensure_profile(db_path, args.fast_profile)
    plan_dir = out / "plan"
    t0 = time.perf_counter()
    run_cli(["plan", "--hardware", f"local:{args.replicas}", "--rate", str(args.rate),
               "--input-len", args.input_len, "--output-len", args.output_len, "--ttft",
               args.ttft, "--tpot", args.tpot, "--db", db_path, "--out", str(plan_dir),
               "--sim-requests", str(args.sim_requests), "--max-replicas", str(args.replicas),
               "--max-num-seqs", "4,8,16", "--max-num-batched-tokens", "256,512,1024",
               "--tensor-parallel", "1", "--weight-dtypes", "bfloat16", "--seed",
               str(args.seed)])
    plan_s = time.perf_counter() - t0
    plan = json.loads((plan_dir / "plan.json").read_text())
    record = out / "bench.json"
    serve_and_bench(plan_dir / "plan.yaml", record, str(args.rate), args.num_requests,
                    args.input_len, args.output_len, args.seed, start_timeout_s=900,
                    bench_timeout_s=7200)
    bench = json.loads(record.read_text())["runs"][0]
    real = bench["stats"]
    sim = replay_bench_run(plan_dir / "plan.yaml", bench, ProfileDB(db_path), args.seed)
    pred = plan["chosen"]["simulated"]
    rows = [("TTFT p90 (ms)", pred["ttft"]["p90"] * 1e3, sim["ttft"]["p90"] * 1e3,
             real["ttft"]["p90"] * 1e3),
            ("TPOT p90 (ms)", pred["tpot"]["p90"] * 1e3, sim["tpot"]["p90"] * 1e3,
             real["tpot"]["p90"] * 1e3),
            ("TTFT p50 (ms)", pred["ttft"]["p50"] * 1e3, sim["ttft"]["p50"] * 1e3,
             real["ttft"]["p50"] * 1e3),
            ("TPOT p50 (ms)", pred["tpot"]["p50"] * 1e3, sim["tpot"]["p50"] * 1e3,
             real["tpot"]["p50"] * 1e3),
            ("goodput (req/s)", pred["run_goodput"], sim["goodput"], real["goodput"]),
            ("SLO attainment", pred["run_slo_attainment"], sim["slo_attainment"],
             real["slo_attainment"])]
    lines = [f"plan: {plan['chosen']['plan']['label']} (planned in {plan_s:.0f} s)",
             "| figure | plan's prediction | simulation of the bench's requests | measured |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {a:.3g} | {b:.3g} | {c:.3g} |" for n, a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    (out / "plan-vs-real.md").write_text(text + "\n")
    write_json(out / "plan-vs-real.json", {**record_header("plan-vs-real"), "plan": plan["chosen"],
                                           "bench": real, "replay": sim, "args": vars(args),
                                           "plan_s": plan_s}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
