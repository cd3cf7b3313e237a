"""The simulated autoscaler against the real one on a load step.

A local cluster (``splitserve serve``: the embedded default model, one
prefill replica, a decode pool of 1-3 replicas on the memory bottleneck
with short delays) gets a low rate, then a high rate (``splitserve bench
--rates LOW,HIGH --num-requests N1,N2``: the second run starts when the
first has drained). The real autoscaler's decisions at which the decode
pool's target or running count changed come from the ops ledger
(``splitserve status --history``). The same requests, on the same clock,
are replayed in the simulator on this machine's measured profile
(``splitserve profile``, run just before), and the two timelines are put
side by side: when each scale-up was decided, when the new replica served,
and the counts.

The simulator's replica start-up is the profile's (the engine build
only); the Serve replica's process start comes on top in reality, so a
second replay takes the start-up the real replicas showed (labelled as
taken from the real run).

    python benchmarks/sim_autoscale_step.py --out bench-results/sim-step
    python benchmarks/sim_autoscale_step.py --reuse bench-results/sim-step   # replay only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitserve.cluster.bench.live import free_port, run_cli, serve_and_bench  # noqa: E402
from splitserve.cluster.bench.record import record_header, write_json  # noqa: E402
from splitserve.cluster.planning.db import ProfileDB  # noqa: E402
from splitserve.cluster.planning.sim.replay import bench_t0, replay_bench_runs  # noqa: E402
from splitserve.cluster.planning.sim.simulator import SimOptions  # noqa: E402

DECODE_APP = "default-decode"
# Serve's controller runs the policy every 0.1 s (ray.serve CONTROL_LOOP_INTERVAL_S)
CONTROL_INTERVAL_S = 0.1


def step_config(args) -> dict:
    auto = {"bottleneck": "memory", "target_kv_usage": 0.9,
            "target_seq_fraction": args.target_seq_fraction, "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": 300, "cooldown_s": args.cooldown_s, "look_back_s": 3,
            "metrics_interval_s": 1}
    return {"name": "step", "models": [{
        "model": {"name": "default", "path": None, "device": "cpu", "num_blocks": 512,
                  "max_num_seqs": args.max_num_seqs},
        "mode": "disaggregated",
        "prefill": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1},
        "decode": {"min_replicas": 1, "max_replicas": args.max_replicas, "num_cpus": 1,
                   "graceful_shutdown_timeout_s": 30, "autoscaling": auto}}],
        "router": {"policy": "cost", "local_prefill_max_tokens": 0},
        "transfer": {"transport": "grpc"},
        "endpoints": {"host": "127.0.0.1", "http_port": free_port(), "grpc_port": free_port()}}


def real_timeline(history: dict, t0: float) -> list[dict]:
    """The decode pool's ledger history on the bench clock (t = 0: first request)."""
    return [{"t": d["time"] - t0, "running": d["running"], "target": d["target"],
             "reason": d["reason"]} for d in history.get(DECODE_APP, [])]


def scale_ups(timeline: list[dict]) -> list[dict]:
    """Each target increase (decided at) and when the running count reached it."""
    out = []
    prev = timeline[0]["target"] if timeline else 1
    for i, e in enumerate(timeline):
        if e["target"] > prev:
            served = next((x["t"] for x in timeline[i:] if x["running"] >= e["target"]), None)
            out.append({"to": e["target"], "decided_s": e["t"], "serving_s": served})
        prev = e["target"]
    return out


def sim_timeline(result) -> list[dict]:
    pool = result.pools[DECODE_APP]
    out = []
    for d in pool.decisions:
        out.append({"t": d["t"], "target": d["to"], "reason": d["reason"]})
    return out


def sim_scale_ups(result) -> list[dict]:
    pool = result.pools[DECODE_APP]
    ready = sorted(s.ready_at for s in pool.slots if s.ready_at is not None and s.ready_at > 0)
    ups = [d for d in pool.decisions if d["to"] > d["from"]]
    out = []
    for i, d in enumerate(ups):
        out.append({"to": d["to"], "decided_s": d["t"],
                    "serving_s": ready[i] if i < len(ready) else None})
    return out


def compare_rows(real: list[dict], sims: dict[str, list[dict]]) -> list[dict]:
    rows = []
    n = max([len(real)] + [len(s) for s in sims.values()])
    for i in range(n):
        row = {"scale_up": i + 1, "real": real[i] if i < len(real) else None}
        for name, s in sims.items():
            row[name] = s[i] if i < len(s) else None
        rows.append(row)
    return rows


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f} s"


def table(rows: list[dict], names: list[str]) -> str:
    head = "| scale-up | real: to, decided, serving | " + " | ".join(
        f"{n}: to, decided (delta), serving" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in rows:
        real = r["real"]
        cells = [f"{real['to']}, {fmt(real['decided_s'])}, {fmt(real['serving_s'])}"
                 if real else "none"]
        for n in names:
            s = r[n]
            if s is None:
                cells.append("none")
                continue
            delta = f" ({s['decided_s'] - real['decided_s']:+.1f} s)" if real else ""
            cells.append(f"{s['to']}, {fmt(s['decided_s'])}{delta}, {fmt(s['serving_s'])}")
        lines.append(f"| {r['scale_up']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(real: list[dict], sims: dict, runs: list[dict], t0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    sends = sorted(run["started_at"] + r["send_time"] - t0 for run in runs for r in run["requests"])
    ax0.hist(sends, bins=max(10, int(sends[-1] - sends[0]) + 1), color="grey")
    ax0.set_ylabel("requests sent per s")
    if real:
        ax1.step([e["t"] for e in real], [e["running"] for e in real], where="post", color="k",
                 label="real: running")
        ax1.step([e["t"] for e in real], [e["target"] for e in real], where="post", color="k",
                 linestyle=":", label="real: target")
    for i, (name, res) in enumerate(sims.items()):
        pool = res.pools[DECODE_APP]
        ts = [s.t for s in pool.samples]
        ax1.step(ts, [s.ready for s in pool.samples], where="post", color=f"C{i}",
                 label=f"{name}: ready")
        ax1.step(ts, [s.target for s in pool.samples], where="post", color=f"C{i}",
                 linestyle=":", label=f"{name}: target")
    ax1.set_ylabel("decode replicas")
    ax1.set_xlabel("seconds since the first request")
    ax1.legend(fontsize=7)
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,5", help="LOW,HIGH req/s")
    ap.add_argument("--num-requests", default="8,150", help="requests of each phase")
    ap.add_argument("--input-len", default="uniform:32:128")
    ap.add_argument("--output-len", default="96")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--target-seq-fraction", type=float, default=0.5)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--upscale-delay-s", type=float, default=2.0)
    ap.add_argument("--cooldown-s", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-args", default="--fast",
                    help="extra arguments of the `splitserve profile` run (default: --fast)")
    ap.add_argument("--out", default="bench-results/sim-step")
    ap.add_argument("--reuse", default=None, metavar="DIR", help="replay the run already in DIR")
    args = ap.parse_args()
    out = Path(args.reuse or args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, record, hist_path = out / "step.yaml", out / "bench.json", out / "history.json"
    db_path = out / "profiles.db"
    if not args.reuse:
        cfg_path.write_text(yaml.safe_dump(step_config(args)))
        run_cli(["profile", "--config", str(cfg_path), "--db", str(db_path)]
                + args.profile_args.split())

        def save_history(address: str) -> None:
            hist_path.write_text(run_cli(["status", "--address", address, "--history", "--json"],
                                         timeout=300, capture=True))

        serve_and_bench(cfg_path, record, args.rates, args.num_requests, args.input_len,
                        args.output_len, args.seed, before_stop=save_history)
    runs = json.loads(record.read_text())["runs"]
    t0 = bench_t0(runs)
    real = real_timeline(json.loads(hist_path.read_text()), t0)
    real_ups = scale_ups(real)
    starts = [u["serving_s"] - u["decided_s"] for u in real_ups if u["serving_s"] is not None]
    real_start = statistics.median(starts) if starts else None
    db = ProfileDB(db_path)
    sims = {"sim (profile start-up)": replay_bench_runs(
        cfg_path, runs, db, SimOptions(seed=args.seed, control_interval_s=CONTROL_INTERVAL_S))}
    if real_start is not None:
        sims[f"sim (start-up {real_start:.1f} s, from the real run)"] = replay_bench_runs(
            cfg_path, runs, db, SimOptions(seed=args.seed, control_interval_s=CONTROL_INTERVAL_S,
                                           replica_start_s=real_start))
    sim_ups = {name: sim_scale_ups(res) for name, res in sims.items()}
    rows = compare_rows(real_ups, sim_ups)
    text = table(rows, list(sims))
    step_at = runs[1]["started_at"] - t0 if len(runs) > 1 else None
    lines = [f"load step at {fmt(step_at)}: {args.rates} req/s, {args.num_requests} requests",
             text]
    for name, res in sims.items():
        s = res.record["summary"]
        lines.append(f"{name}: profile start-up "
                     f"{res.pools[DECODE_APP].profile.startup_s:.2f} s; TTFT p50 "
                     f"{s['ttft']['p50'] * 1e3:.0f} ms, TPOT p50 {s['tpot']['p50'] * 1e3:.0f} ms")
    real_stats = [r["stats"] for r in runs]
    lines.append("real: " + "; ".join(f"run {i}: TTFT p50 {st['ttft']['p50'] * 1e3:.0f} ms, "
                                      f"TPOT p50 {st['tpot']['p50'] * 1e3:.0f} ms"
                                      for i, st in enumerate(real_stats)))
    print("\n".join(lines))
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(real, sims, runs, t0, out / "timeline.png")
    write_json(out / "comparison.json", {
        **record_header("sim-autoscale-step"), "args": vars(args), "step_at_s": step_at,
        "real_timeline": real, "real_scale_ups": real_ups, "real_start_s": real_start,
        "sim_timelines": {n: sim_timeline(r) for n, r in sims.items()},
        "sim_scale_ups": sim_ups, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
