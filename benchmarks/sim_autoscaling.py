"""Autoscaling policies over a (compressed) day of diurnal traffic, in the
simulator, on derived H100 profiles of a Llama-3.1-8B shape.

Policies, each on the same requests (one seeded diurnal trace):

- ``bottleneck``: each pool on its own bottleneck (prefill: compute, the
  predicted queueing delay and busy share; decode: memory, KV and running
  sequences, and TPOT);
- ``static-peak``: fixed pools, the fewest replicas of each pool that meet
  the SLOs at the peak rate, found by simulating the peak rate steadily;
- ``requests-N``: both pools on queue length alone (``bottleneck:
  requests``, Ray Serve's default policy) with ``target_ongoing_requests``
  N on the decode pool (``--requests-targets``); the prefill pool's target
  is ``--prefill-ongoing``.

Compression: the day's curve (``--day-s``, default 900 s: a 24-hour day
96x faster) keeps the shape (trough at t = 0, peak at half the period,
peak/trough = ``--peak``/``--trough``), while start-up (derived: 30 s +
weights / 2 GB/s), the autoscaler's delays and its metrics windows keep
their real durations, which
is harder on every reactive policy than a real day (its ramps are 96x
steeper). Every figure is
*derived* (roofline of datasheet figures under the efficiency model of
cluster/planning/catalog.yaml).

    python benchmarks/sim_autoscaling.py --out bench-results/sim-autoscaling
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from splitserve.cluster.bench.datasets import parse_length_dist  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.config import parse_config  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.shapes import PRESETS  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions, Simulation  # noqa: E402
from splitserve.cluster.planning.workload import Diurnal, synthetic  # noqa: E402

DELAYS = {"upscale_delay_s": 10, "downscale_delay_s": 60, "cooldown_s": 20, "look_back_s": 10,
          "metrics_interval_s": 2}


def base_config(args) -> dict:
    pool = {"min_replicas": 1, "max_replicas": args.max_replicas, "num_gpus": 1,
            "graceful_shutdown_timeout_s": 60}
    return {"name": "diurnal", "models": [{
        "model": {"name": "llama", "path": "/models/llama", "dtype": "bfloat16",
                  "kv_cache_memory_gb": 40, "max_num_seqs": 256,
                  "max_num_batched_tokens": 2048, "max_model_len": 16384},
        "mode": "disaggregated", "prefill": dict(pool), "decode": dict(pool)}],
        "router": {"policy": "cost", "max_queue_per_model": 1 << 20, "max_queue_delay_s": 120,
                   "network_bytes_per_s": 5e10, "local_prefill_max_tokens": 0},
        "transfer": {"transport": "torch_dist"},
        "slo": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo}}


def with_policy(base: dict, policy: str, args, fixed: tuple[int, int] | None = None) -> dict:
    cfg = copy.deepcopy(base)
    served = cfg["models"][0]
    pre, dec = served["prefill"], served["decode"]
    if policy == "bottleneck":
        pre["autoscaling"] = {"bottleneck": "compute", "target_ttft_s": args.ttft_slo / 4,
                              "target_busy_fraction": 0.7, **DELAYS}
        dec["autoscaling"] = {"bottleneck": "memory", "target_kv_usage": 0.7,
                              "target_seq_fraction": 0.7, "target_tpot_s": args.tpot_slo * 0.7,
                              **DELAYS}
    elif policy.startswith("requests-"):
        pre["autoscaling"] = {"bottleneck": "requests",
                              "target_ongoing_requests": args.prefill_ongoing, **DELAYS}
        dec["autoscaling"] = {"bottleneck": "requests",
                              "target_ongoing_requests": float(policy.split("-", 1)[1]), **DELAYS}
    else:
        for spec, n in zip((pre, dec), fixed):
            spec.update(min_replicas=n, max_replicas=n, autoscaling=None)
    cfg["name"] = policy
    return cfg


def workload(args, peak_only: bool = False):
    ins, outs = parse_length_dist(args.input_len), parse_length_dist(args.output_len)
    if peak_only:  # the day's busiest rate, steadily
        return synthetic(args.mean_rate * args.peak, ins, outs, seed=args.seed + 1,
                         duration_s=args.peak_probe_s)
    return synthetic(args.mean_rate, ins, outs, seed=args.seed, duration_s=args.day_s,
                     diurnal=Diurnal(args.day_s, args.peak, args.trough))


def simulate(cfg: dict, wl, db: ProfileDB, seed: int, scale: int):
    sim = Simulation(parse_config(cfg), {"llama": PRESETS["llama-3.1-8b"]},
                     lambda m, r: "h100-sxm", db, wl,
                     SimOptions(seed=seed, drain_s=300, kv_block_scale=scale, sample_s=5.0))
    return sim, sim.run().record


def size_for_peak(base: dict, args, db: ProfileDB) -> tuple[tuple[int, int], list[dict]]:
    """The fewest decode replicas meeting ``--attainment`` at the peak rate
    with prefill at its maximum, then the fewest prefill replicas with that
    decode pool (the pools' loads are nearly independent: prefill's is
    prompt tokens, decode's the running sequences)."""
    tried = []

    def meets(pre: int, dec: int) -> bool:
        _, rec = simulate(with_policy(base, "static", args, (pre, dec)),
                          workload(args, peak_only=True), db, args.seed, args.kv_block_scale)
        att = rec["summary"]["slo_attainment"]
        tried.append({"prefill": pre, "decode": dec, "attainment": att})
        print(f"  static {pre}P+{dec}D at peak {args.mean_rate * args.peak:g} req/s: "
              f"SLO {att:.1%}", file=sys.stderr, flush=True)
        return att >= args.attainment

    top = args.max_replicas
    dec = next((d for d in range(1, top + 1) if meets(top, d)), None)
    pre = None if dec is None else next((p for p in range(1, top) if meets(p, dec)), top)
    if dec is None:
        raise SystemExit(f"no static size up to {top}+{top} meets {args.attainment:.0%} at the "
                         f"peak; raise --max-replicas")
    return (pre, dec), tried


def attainment_over_time(sim: Simulation, slo: dict, bin_s: float, day_s: float) -> list[float]:
    log = sim.log
    arr = np.frombuffer(log.arrival, dtype=np.float64)
    ttft = np.frombuffer(log.ttft, dtype=np.float64)
    tpot = np.frombuffer(log.tpot, dtype=np.float64)
    good = ~np.isnan(ttft) & (ttft <= slo["ttft_s"]) & (np.isnan(tpot) | (tpot <= slo["tpot_s"]))
    edges = np.arange(0.0, day_s + bin_s, bin_s)
    idx = np.digitize(arr, edges) - 1
    return [float(good[idx == i].mean()) if (idx == i).any() else float("nan")
            for i in range(len(edges) - 1)]


def row_of(policy: str, rec: dict, sim: Simulation, args) -> dict:
    s = rec["summary"]
    pools = {}
    for app, p in rec["pools"].items():
        tl = p["timeline"]
        pools[p["role"]] = {
            "t": [x["t"] for x in tl],
            "replicas": [x["ready"] + x["starting"] + x["draining"] for x in tl],
            "ready": [x["ready"] for x in tl], "peak": p["peak_replicas"],
            "device_hours": p["device_hours"],
            "scale_events": len(p["scale_events"])}
    return {"policy": policy, "requests": s["num_requests"], "failed": s["failed"],
            "slo_attainment": s["slo_attainment"], "ttft_p90": s["ttft"]["p90"],
            "tpot_p90": s["tpot"]["p90"], "gpu_hours": rec["cost"]["device_hours"],
            "mean_gpus": rec["cost"]["mean_devices"], "cost_usd": rec["cost"]["usd"],
            "pools": pools, "sim_cpu_s": rec["sim"]["cpu_s"],
            "attainment_bins": attainment_over_time(sim, rec_slo(args), args.bin_s, args.day_s)}


def rec_slo(args) -> dict:
    return {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo}


def table(rows: list[dict], args) -> str:
    static = next(r for r in rows if r["policy"] == "static-peak")
    lines = ["| policy | SLO attainment | TTFT p90 | TPOT p90 | GPU-hours (sim) | vs static | "
             "mean GPUs | peak P+D | scale events |", "|" + "---|" * 9]
    for r in rows:
        p, d = r["pools"]["prefill"], r["pools"]["decode"]
        lines.append(
            f"| {r['policy']} | {r['slo_attainment']:.1%} | {r['ttft_p90'] * 1e3:.0f} ms | "
            f"{r['tpot_p90'] * 1e3:.1f} ms | {r['gpu_hours']:.3f} | "
            f"{r['gpu_hours'] / static['gpu_hours'] - 1:+.0%} | {r['mean_gpus']:.2f} | "
            f"{p['peak']}+{d['peak']} | {p['scale_events'] + d['scale_events']} |")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    d = Diurnal(args.day_s, args.peak, args.trough)
    ts = np.linspace(0, args.day_s, 400)
    axes[0].plot(ts, [args.mean_rate * d.factor(t) for t in ts], color="k")
    axes[0].set_ylabel("offered req/s")
    axes[0].set_title(f"compressed day ({args.day_s:g} s), Llama-3.1-8B shape on derived "
                      f"H100 profiles")
    for i, r in enumerate(rows):
        c = f"C{i}"
        for ax, role in ((axes[1], "prefill"), (axes[2], "decode")):
            p = r["pools"][role]
            ax.step(p["t"], p["replicas"], where="post", color=c, label=r["policy"])
        centers = (np.arange(len(r["attainment_bins"])) + 0.5) * args.bin_s
        axes[3].plot(centers, np.array(r["attainment_bins"]) * 100, marker=".", color=c,
                     label=f"{r['policy']} ({r['slo_attainment']:.1%}, "
                           f"{r['gpu_hours']:.2f} GPU-h)")
    axes[1].set_ylabel("prefill replicas")
    axes[2].set_ylabel("decode replicas")
    axes[3].set_ylabel(f"SLO attainment per {args.bin_s:g} s (%)")
    axes[3].set_xlabel("simulated seconds")
    axes[1].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--day-s", type=float, default=900.0, help="the compressed day's length")
    ap.add_argument("--mean-rate", type=float, default=60.0, help="mean req/s over the day")
    ap.add_argument("--peak", type=float, default=1.8, help="peak rate / mean rate")
    ap.add_argument("--trough", type=float, default=0.2, help="trough rate / mean rate")
    ap.add_argument("--input-len", default="lognormal:6.5:0.6:32:4000")
    ap.add_argument("--output-len", default="lognormal:5.0:0.6:4:1000")
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tpot-slo", type=float, default=0.05)
    ap.add_argument("--max-replicas", type=int, default=8, help="per pool")
    ap.add_argument("--requests-targets", default="16,64",
                    help="decode target_ongoing_requests of each requests-N policy")
    ap.add_argument("--prefill-ongoing", type=float, default=2.0,
                    help="prefill target_ongoing_requests of the requests policies")
    ap.add_argument("--attainment", type=float, default=0.99,
                    help="what static-peak must reach at the peak rate")
    ap.add_argument("--peak-probe-s", type=float, default=60.0)
    ap.add_argument("--bin-s", type=float, default=60.0, help="attainment plot resolution")
    ap.add_argument("--kv-block-scale", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/sim-autoscaling")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = ProfileDB(os.path.join(tempfile.mkdtemp(), "p.db"))  # catalog rows only: derived
    base = base_config(args)
    t0 = time.time()
    fixed, tried = size_for_peak(base, args, db)
    policies = ["bottleneck", "static-peak"] + [
        f"requests-{float(x):g}" for x in args.requests_targets.split(",")]
    rows = []
    for policy in policies:
        cfg = with_policy(base, policy, args, fixed)
        sim, rec = simulate(cfg, workload(args), db, args.seed, args.kv_block_scale)
        rows.append(row_of(policy, rec, sim, args))
        r = rows[-1]
        print(f"{policy}: SLO {r['slo_attainment']:.1%}, {r['gpu_hours']:.3f} GPU-h, "
              f"{r['requests']} requests, {r['sim_cpu_s']:.0f} CPU s", file=sys.stderr, flush=True)
    text = table(rows, args)
    print(text)
    (out / "table.md").write_text(text + "\n")
    plot(rows, args, out / "autoscaling.png")
    write_json(out / "record.json", {
        **record_header("sim-autoscaling"), "args": vars(args),
        "profile": "derived: roofline of llama-3.1-8b on h100-sxm datasheet figures",
        "static_sizing": {"chosen": {"prefill": fixed[0], "decode": fixed[1]}, "tried": tried},
        "delays": DELAYS, "rows": rows, "wall_s": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
