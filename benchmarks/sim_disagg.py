"""Disaggregated against colocated serving in simulation, on derived H100
profiles for a Llama-3.1-8B shape (the direction DistServe and Splitwise
report): goodput per GPU under a tight TPOT SLO across request rates, and
the rate where one layout overtakes the other.

Same GPUs for both layouts (``--gpus``; disaggregated splits them
``--prefill-share`` to prefill), fixed pool sizes (no autoscaling), the
same synthetic workload per rate. Every figure is *derived*: roofline
step times from datasheet peaks under the efficiency model of
cluster/planning/catalog.yaml.

    python benchmarks/sim_disagg.py --gpus 8 --rates 20,40,60,80,100,120 --out bench-results/sim-disagg.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitserve.cluster.bench.datasets import parse_length_dist  # noqa: E402
from splitserve.cluster.bench.record import print_and_dump  # noqa: E402
from splitserve.cluster.config import parse_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation  # noqa: E402
from splitserve.cluster.planning.workload import synthetic  # noqa: E402


def config(mode: str, prefill: int, decode: int, ttft: float, tpot: float, budget: int) -> dict:
    fixed = lambda n: {"min_replicas": n, "max_replicas": n, "num_gpus": 1, "autoscaling": None}  # noqa: E731
    return {"name": mode, "models": [{
        "model": {"name": "llama", "path": "/models/llama", "dtype": "bfloat16",
                  "kv_cache_memory_gb": 40, "max_num_seqs": 256,
                  "max_num_batched_tokens": budget, "max_model_len": 16384},
        "mode": mode, "prefill": fixed(max(prefill, 1)), "decode": fixed(decode)}],
        "router": {"policy": "cost", "max_queue_per_model": 1 << 20,
                   "network_bytes_per_s": 5e10, "local_prefill_max_tokens": 0},
        "transfer": {"transport": "torch_dist"}, "slo": {"ttft_s": ttft, "tpot_s": tpot}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--prefill-share", type=float, default=0.5)
    ap.add_argument("--rates", default="10,20,30,40,50,60,80")
    ap.add_argument("--seconds", type=float, default=60.0, help="arrivals per point")
    ap.add_argument("--input-len", default="lognormal:7.0:0.6:64:8000")
    ap.add_argument("--output-len", default="lognormal:5.0:0.6:4:1000")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.025)
    ap.add_argument("--chunk", type=int, default=2048,
                    help="max_num_batched_tokens (the colocated layout's prefill chunk)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))
    prefill = round(args.gpus * args.prefill_share)
    layouts = {"disaggregated": (prefill, args.gpus - prefill), "colocated": (0, args.gpus)}
    points = []
    for rate in (float(r) for r in args.rates.split(",")):
        row = {"rate": rate}
        for mode, (p, d) in layouts.items():
            cfg = parse_config(config(mode, p, d, args.ttft_slo, args.tpot_slo, args.chunk))
            wl = synthetic(rate, parse_length_dist(args.input_len),
                           parse_length_dist(args.output_len), seed=0, duration_s=args.seconds)
            rec = Simulation(cfg, {"llama": PRESETS["llama-3.1-8b"]}, lambda m, r: "h100-sxm",
                             db, wl, SimOptions(seed=0, drain_s=300)).run().record
            s = rec["summary"]
            row[mode] = {"goodput_per_gpu": s["goodput"] / args.gpus,
                         "slo_attainment": s["slo_attainment"], "ttft_p90": s["ttft"]["p90"],
                         "tpot_p90": s["tpot"]["p90"]}
        points.append(row)
        d, c = row["disaggregated"], row["colocated"]
        print(f"rate {rate:6.1f}: goodput/GPU disaggregated {d['goodput_per_gpu']:.2f} "
              f"(SLO {d['slo_attainment']:.0%}, TPOT p90 {d['tpot_p90'] * 1e3:.1f} ms)  "
              f"colocated {c['goodput_per_gpu']:.2f} (SLO {c['slo_attainment']:.0%}, TPOT p90 "
              f"{c['tpot_p90'] * 1e3:.1f} ms)", flush=True)
    # the lowest rate from which disaggregated serves more within SLO per GPU
    crossover = next((p["rate"] for p in points
                      if p["disaggregated"]["goodput_per_gpu"] > p["colocated"]["goodput_per_gpu"]
                      * 1.01), None)
    best = {m: max(p[m]["goodput_per_gpu"] for p in points) for m in layouts}
    summary = {"gpus": args.gpus, "prefill_gpus": prefill, "tpot_slo_s": args.tpot_slo,
               "ttft_slo_s": args.ttft_slo, "crossover_rate": crossover,
               "best_goodput_per_gpu": best,
               "ratio": best["disaggregated"] / best["colocated"] if best["colocated"] else None,
               "profile": "derived: roofline of llama-3.1-8b on h100-sxm datasheet figures",
               "points": points}
    print_and_dump({k: v for k, v in summary.items() if k != "points"}, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
