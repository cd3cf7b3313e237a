"""How fast the simulator runs against real time, for a cluster of N GPUs
at full load (the issue's scale targets).

Llama-3.1-8B on derived H100 SXM profiles (datasheet x efficiency model),
disaggregated with a fixed prefill:decode split sized so both pools run
near their capacity for the workload; prompts and outputs from lognormal
distributions (median ~700 / ~150 tokens). The offered rate is the
``--load`` share of what the pools can serve, estimated from the same
roofline the simulator uses. Reports simulated seconds per wall and per
CPU second (this machine is shared: CPU time is the steadier figure) and
where the time goes per request.

    python benchmarks/sim_speed.py --gpus 1000 --sim-seconds 20 --out bench-results/sim-speed.json
    python benchmarks/sim_speed.py --gpus 100 --diurnal-hours 24   # the 24 h target
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitserve.cluster.bench.datasets import parse_length_dist  # noqa: E402
from splitserve.cluster.bench.record import print_and_dump  # noqa: E402
from splitserve.cluster.config import parse_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.hardware import catalog  # noqa: E402
from splitserve.cluster.planning.records import EngineSettings  # noqa: E402
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation  # noqa: E402
from splitserve.cluster.planning.step_model import roofline  # noqa: E402
from splitserve.cluster.planning.workload import Diurnal, synthetic  # noqa: E402

SHAPE = PRESETS["llama-3.1-8b"]
INPUT, OUTPUT = "lognormal:6.5:0.7:16:8000", "lognormal:5.0:0.7:2:2000"
MAX_SEQS, BUDGET, KV_GB = 256, 8192, 40


def capacity(mean_in: float, mean_out: float) -> tuple[float, float]:
    """(requests/s one prefill GPU serves, requests/s one decode GPU serves)."""
    m = roofline(SHAPE, catalog()["h100-sxm"], EngineSettings())
    per_prompt = m.step_s(BUDGET, BUDGET * mean_in / 2, 0, 0) * mean_in / BUDGET
    batch = MAX_SEQS
    ctx = batch * (mean_in + mean_out / 2)
    per_token = m.step_s(0, 0, batch, ctx) / batch
    return 1.0 / per_prompt, 1.0 / (per_token * mean_out)


def config(prefill: int, decode: int) -> dict:
    fixed = lambda n: {"min_replicas": n, "max_replicas": n, "num_gpus": 1, "autoscaling": None}  # noqa: E731
    return {"name": "speed", "models": [{
        "model": {"name": "llama", "path": "/models/llama", "dtype": "bfloat16",
                  "kv_cache_memory_gb": KV_GB, "max_num_seqs": MAX_SEQS,
                  "max_num_batched_tokens": BUDGET, "max_model_len": 16384},
        "prefill": fixed(prefill), "decode": fixed(decode)}],
        "router": {"policy": "cost", "max_queue_per_model": 1 << 20,
                   "network_bytes_per_s": 5e10, "local_prefill_max_tokens": 256},
        "transfer": {"transport": "torch_dist"}, "slo": {"ttft_s": 1.0, "tpot_s": 0.05}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1000)
    ap.add_argument("--load", type=float, default=0.8, help="share of the estimated capacity")
    ap.add_argument("--sim-seconds", type=float, default=20.0)
    ap.add_argument("--diurnal-hours", type=float, default=None,
                    help="instead: this many hours of a diurnal day (peak at --load)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-coalesce", action="store_true")
    ap.add_argument("--kv-block-scale", type=int, default=1)
    args = ap.parse_args()

    rng_in, rng_out = parse_length_dist(INPUT), parse_length_dist(OUTPUT)
    mean_in = math.exp(6.5 + 0.7 ** 2 / 2)
    mean_out = math.exp(5.0 + 0.7 ** 2 / 2)
    p_cap, d_cap = capacity(mean_in, mean_out)
    share = d_cap / (p_cap + d_cap)  # prefill GPUs so both pools match
    prefill = max(1, round(args.gpus * share))
    decode = max(1, args.gpus - prefill)
    rate = args.load * min(prefill * p_cap, decode * d_cap)
    diurnal = None
    duration = args.sim_seconds
    if args.diurnal_hours:
        # rate(t) = rate x factor(t): the factor peaks at 1.0 (the offered load) and
        # bottoms at 0.2 at midnight (t = 0)
        duration = args.diurnal_hours * 3600
        diurnal = Diurnal(86400.0, peak=1.0, trough=0.2)
    wl = synthetic(rate, rng_in, rng_out, seed=0, duration_s=duration, diurnal=diurnal)
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))
    opts = SimOptions(seed=0, sample_s=max(1.0, duration / 2000), progress=True,
                      coalesce=not args.no_coalesce, drain_s=120.0,
                      kv_block_scale=args.kv_block_scale)
    sim = Simulation(parse_config(config(prefill, decode)), {"llama": SHAPE},
                     lambda m, r: "h100-sxm", db, wl, opts)
    t0, c0 = time.perf_counter(), time.process_time()
    rec = sim.run().record
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s, sm = rec["summary"], rec["sim"]
    out = {
        "gpus": args.gpus, "prefill_gpus": prefill, "decode_gpus": decode,
        "offered_rate": rate, "load": args.load, "diurnal_hours": args.diurnal_hours,
        "requests": sm["requests"], "completed": s["completed"], "simulated_s": sm["simulated_s"],
        "arrivals_s": duration, "wall_s": wall, "cpu_s": cpu,
        "x_real_time_wall": sm["simulated_s"] / wall, "x_real_time_cpu": sm["simulated_s"] / cpu,
        "cpu_ms_per_request": cpu / max(sm["requests"], 1) * 1e3, "events": sm["events"],
        # at full load the cost is per request: simulated seconds per CPU second
        # while arrivals continue at the offered rate (the drain at the end is cheap)
        "x_real_time_cpu_steady": 1.0 / (rate * cpu / max(sm["requests"], 1)),
        "ttft_p50": s["ttft"]["p50"], "tpot_p50": s["tpot"]["p50"],
        "slo_attainment": s["slo_attainment"], "coalesce": not args.no_coalesce,
        "kv_block_scale": args.kv_block_scale,
        "machine": os.uname().nodename, "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print_and_dump(out, out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
