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
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitserve.cluster.config import load_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import local_cpu_key  # noqa: E402
from splitserve.cluster.planning.sim.cli_args import shapes_for  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation  # noqa: E402
from splitserve.cluster.planning.workload import TraceRequest  # noqa: E402

PY = sys.executable
CLI = [PY, "-m", "splitserve.cluster.cli.main"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=_env(), check=True, **kw)


def ensure_profile(db_path: str, fast: bool) -> None:
    db = ProfileDB(db_path)
    key = local_cpu_key(1)
    if any(p["hardware_key"] == key for p in db.profiled()):
        return
    run(CLI + ["profile", "--config", str(ROOT / "deploy/configs/local.yaml"), "--db", db_path,
               "--handoff"] + (["--fast"] if fast else []))


def serve_and_bench(cfg_path: Path, args, record: Path) -> None:
    cfg = load_config(cfg_path)
    server = subprocess.Popen(CLI + ["serve", "--config", str(cfg_path)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 900
        for line in server.stdout:
            sys.stderr.write(f"  [serve] {line}")
            if line.startswith("ready in"):
                break
            if time.time() > deadline:
                raise RuntimeError("the cluster did not start in 900 s")
        run(CLI + ["bench", "--url", f"http://127.0.0.1:{cfg.endpoints.http_port}", "--model",
                   cfg.models[0].model.name, "--rates", str(args.rate), "--num-requests",
                   str(args.num_requests), "--input-len", args.input_len, "--output-len",
                   args.output_len, "--seed", str(args.seed), "--ttft-slo", str(cfg.slo.ttft_s),
                   "--tpot-slo", str(cfg.slo.tpot_s), "--out", str(record), "--no-progress"],
            timeout=7200)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def replay(cfg_path: Path, bench_run: dict, db: ProfileDB, seed: int) -> dict:
    cfg = load_config(cfg_path)
    reqs = sorted(bench_run["requests"], key=lambda r: r["send_time"])
    t0 = reqs[0]["send_time"]
    wl = [TraceRequest(r["send_time"] - t0, r["prompt_len"], r["output_len"]) for r in reqs]
    sim = Simulation(cfg, shapes_for(cfg, []), lambda m, role: "local", db, wl,
                     SimOptions(seed=seed))
    return sim.run().record["summary"]


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
    run(CLI + ["plan", "--hardware", f"local:{args.replicas}", "--rate", str(args.rate),
               "--input-len", args.input_len, "--output-len", args.output_len, "--ttft",
               args.ttft, "--tpot", args.tpot, "--db", db_path, "--out", str(plan_dir),
               "--sim-requests", str(args.sim_requests), "--max-replicas", str(args.replicas),
               "--max-num-seqs", "4,8,16", "--max-num-batched-tokens", "256,512,1024",
               "--tensor-parallel", "1", "--weight-dtypes", "bfloat16", "--seed",
               str(args.seed)])
    plan_s = time.perf_counter() - t0
    plan = json.loads((plan_dir / "plan.json").read_text())
    record = out / "bench.json"
    serve_and_bench(plan_dir / "plan.yaml", args, record)
    bench = json.loads(record.read_text())["runs"][0]
    real = bench["stats"]
    sim = replay(plan_dir / "plan.yaml", bench, ProfileDB(db_path), args.seed)
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
    (out / "plan-vs-real.json").write_text(json.dumps(
        {"plan": plan["chosen"], "bench": real, "replay": sim, "args": vars(args),
         "plan_s": plan_s}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
