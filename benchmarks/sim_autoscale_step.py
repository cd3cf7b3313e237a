"""The simulated autoscaler against the real one on a load step.

A local cluster (``splitserve serve``: the embedded default model, one
prefill replica, a decode pool of 1-3 replicas on the memory bottleneck
with short delays) gets a low rate, then a high rate (``splitserve bench
--rates LOW,HIGH --num-requests N1,N2``: the second run starts when the
first has drained). The real autoscaler's decisions at which the decode
pool's target or running count changed come from the ops ledger
(``splitserve status --history``). The same requests, on the same clock,
are replayed in the simulator on this machine's measured profile
(``splitserve profile``, run just before, and the serving path's overhead
probed on the cluster before the bench: ``splitserve profile
--serving-url``), and the two timelines are put side by side: for each
replica count, when the target reached it and when that many replicas
served.

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


def reached(timeline: list[dict], top: int) -> list[dict]:
    """For each count k in 2..top: when the target first reached k (decided)
    and when k replicas first ran (serving), on the bench clock."""
    out = []
    for k in range(2, top + 1):
        decided = next((e["t"] for e in timeline if e["target"] >= k), None)
        serving = next((e["t"] for e in timeline if e["running"] >= k), None)
        out.append({"replicas": k, "decided_s": decided, "serving_s": serving})
    return out


def sim_timeline(result) -> list[dict]:
    """The simulated decode pool as (t, running, target) at each change."""
    pool = result.pools[DECODE_APP]
    events = [(d["t"], "target", d["to"]) for d in pool.decisions]
    for s in pool.slots:
        if s.ready_at is not None:
            events.append((s.ready_at, "up", 1))
        if s.gone_at is not None and s.ready_at is not None:
            events.append((s.gone_at, "up", -1))
    target, running, out = pool.spec.initial_replicas or pool.spec.min_replicas, 0, []
    for t, kind, v in sorted(events, key=lambda e: e[0]):
        if kind == "target":
            target = v
        else:
            running += v
        out.append({"t": t, "running": running, "target": target})
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f} s"


def table(real: list[dict], sims: dict[str, list[dict]]) -> str:
    names = list(sims)
    head = "| decode replicas | real: decided / serving | " + " | ".join(
        f"{n}: decided (vs real) / serving" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for i, r in enumerate(real):
        cells = [f"{fmt(r['decided_s'])} / {fmt(r['serving_s'])}"]
        for n in names:
            s = sims[n][i]
            delta = ""
            if s["decided_s"] is not None and r["decided_s"] is not None:
                delta = f" ({s['decided_s'] - r['decided_s']:+.1f} s)"
            cells.append(f"{fmt(s['decided_s'])}{delta} / {fmt(s['serving_s'])}")
        lines.append(f"| {r['replicas']} | " + " | ".join(cells) + " |")
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
        tl = [{"t": 0.0, "running": 1, "target": 1}] + sim_timeline(res)
        ax1.step([e["t"] for e in tl], [e["running"] for e in tl], where="post", color=f"C{i}",
                 label=f"{name}: running")
        ax1.step([e["t"] for e in tl], [e["target"] for e in tl], where="post", color=f"C{i}",
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
    ap.add_argument("--no-serving-probe", action="store_true",
                    help="do not measure the serving path's overhead before the bench")
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

        def probe(url: str) -> None:  # the serving path's overhead on this cluster
            run_cli(["profile", "--config", str(cfg_path), "--db", str(db_path),
                     "--serving-url", url])

        serve_and_bench(cfg_path, record, args.rates, args.num_requests, args.input_len,
                        args.output_len, args.seed, before_stop=save_history,
                        before_bench=None if args.no_serving_probe else probe)
    runs = json.loads(record.read_text())["runs"]
    t0 = bench_t0(runs)
    real = real_timeline(json.loads(hist_path.read_text()), t0)
    top = args.max_replicas
    real_reached = reached(real, top)
    starts = []
    for k in real_reached:
        if k["serving_s"] is not None and k["decided_s"] is not None:
            starts.append(k["serving_s"] - k["decided_s"])
    real_start = statistics.median(starts) if starts else None
    db = ProfileDB(db_path)
    base = dict(seed=args.seed, control_interval_s=CONTROL_INTERVAL_S)
    sims = {"sim": replay_bench_runs(cfg_path, runs, db, SimOptions(**base))}
    if real_start is not None:
        sims[f"sim, start-up {real_start:.0f} s as measured"] = replay_bench_runs(
            cfg_path, runs, db, SimOptions(**base, replica_start_s=real_start))
    sim_reached = {n: reached(sim_timeline(r), top) for n, r in sims.items()}
    text = table(real_reached, sim_reached)
    step_at = runs[1]["started_at"] - t0 if len(runs) > 1 else None
    lines = [f"load step at {fmt(step_at)}: {args.rates} req/s, {args.num_requests} requests; "
             f"times from the first request", text]
    for name, res in sims.items():
        s = res.record["summary"]
        lines.append(f"{name}: start-up {res.pools[DECODE_APP].profile.startup_s:.2f} s in the "
                     f"profile; TTFT p50 {s['ttft']['p50'] * 1e3:.0f} ms, TPOT p50 "
                     f"{s['tpot']['p50'] * 1e3:.0f} ms over both phases")
    real_stats = [r["stats"] for r in runs]
    lines.append("real: " + "; ".join(f"phase {i + 1}: TTFT p50 {st['ttft']['p50'] * 1e3:.0f} ms, "
                                      f"TPOT p50 {st['tpot']['p50'] * 1e3:.0f} ms"
                                      for i, st in enumerate(real_stats)))
    print("\n".join(lines))
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(real, sims, runs, t0, out / "timeline.png")
    write_json(out / "comparison.json", {
        **record_header("sim-autoscale-step"), "args": vars(args), "step_at_s": step_at,
        "real_timeline": real, "real_reached": real_reached, "real_start_s": real_start,
        "sim_timelines": {n: sim_timeline(r) for n, r in sims.items()},
        "sim_reached": sim_reached,
        "sim_summaries": {n: r.record["summary"] for n, r in sims.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
