"""A simulation's outputs: the JSON record, per-request CSV, PNG plots and
a short text summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from splitserve.cluster.planning.sim.metrics import RequestLog


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(record: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_clean(record), indent=1) + "\n")


def write_requests_csv(log: RequestLog, path: str | Path) -> None:
    """One row per request: arrival, lengths, TTFT, TPOT, E2E (empty: failed)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_len", "output_len", "ttft_s", "tpot_s", "e2e_s",
                    "local_prefill", "retries"])
        for i in range(len(log)):
            row = [f"{log.arrival[i]:.6f}", log.prompt_len[i], log.output_len[i]]
            for v in (log.ttft[i], log.tpot[i], log.e2e[i]):
                row.append("" if v != v else f"{v:.6f}")
            w.writerow(row + [log.local[i], log.retries[i]])


def text_summary(record: dict) -> str:
    s = record["summary"]
    c = record["cost"]
    sim = record["sim"]
    ms = lambda d, k: "nan" if d[k] is None or d[k] != d[k] else f"{d[k] * 1e3:.1f}"  # noqa: E731
    lines = [
        f"{s['num_requests']} requests ({s['completed']} completed, {s['failed']} failed) over "
        f"{s['duration_s']:.1f}s simulated",
        f"TTFT p50/p90/p99 {ms(s['ttft'], 'p50')}/{ms(s['ttft'], 'p90')}/{ms(s['ttft'], 'p99')} ms"
        f"  TPOT {ms(s['tpot'], 'p50')}/{ms(s['tpot'], 'p90')}/{ms(s['tpot'], 'p99')} ms"
        f"  ITL p50 {ms(s['itl'], 'p50')} ms  E2E p50 {ms(s['e2e'], 'p50')} ms",
        f"goodput {s['goodput']:.2f} req/s ({s['goodput_per_device']:.3f} per device), SLO "
        f"attainment {s['slo_attainment']:.1%} (TTFT <= {s['ttft_slo_s']}s, TPOT <= "
        f"{s['tpot_slo_s']}s)",
        f"{c['device_hours']:.2f} device-hours, mean {c['mean_devices']:.1f} devices, peak "
        f"{c['peak_devices']}" + (f", ${c['usd']:.2f}" if c["usd"] is not None else ", no price"),
    ]
    for app, p in record["pools"].items():
        prof = p["profile"]
        lines.append(f"  {app}: peak {p['peak_replicas']} replicas, {len(p['scale_events'])} "
                     f"scale changes, {prof['hardware']} ({prof['hardware_provenance']}), step "
                     f"model {prof['step_model_provenance']}")
    lines.append(f"simulated {sim['simulated_s']:.0f}s in {sim['wall_s']:.1f}s wall "
                 f"({sim['speed_x_real_time']:.1f}x real time, {sim['cpu_s']:.1f}s CPU)")
    return "\n".join(lines)


def plot(record: dict, path: str | Path) -> None:
    """Three panels: latency percentiles, replicas per pool over time,
    utilization (busy share, KV in use) per pool over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["summary"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 11))
    ax = axes[0]
    metrics = ("ttft", "tpot", "itl", "e2e")
    width = 0.25
    for j, q in enumerate(("p50", "p90", "p99")):
        vals = [(s[m][q] or 0.0) * 1e3 if s[m][q] == s[m][q] else 0.0 for m in metrics]
        ax.bar([i + (j - 1) * width for i in range(len(metrics))], vals, width, label=q)
    ax.set_xticks(range(len(metrics)), [m.upper() for m in metrics])
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title(f"latency (SLO attainment {s['slo_attainment']:.1%}, goodput "
                 f"{s['goodput']:.2f} req/s)")
    ax.legend()
    for app, p in record["pools"].items():
        tl = p["timeline"]
        t = [x["t"] for x in tl]
        axes[1].step(t, [x["ready"] for x in tl], where="post", label=f"{app}")
        axes[1].step(t, [x["target"] for x in tl], where="post", linestyle=":", alpha=0.6)
        axes[2].plot(t, [x["busy"] for x in tl], label=f"{app} busy")
        axes[2].plot(t, [x["kv_used"] for x in tl], linestyle="--", label=f"{app} KV used")
    axes[1].set_ylabel("ready replicas (dotted: target)")
    axes[1].set_title("replicas per pool")
    axes[1].legend(fontsize=8)
    axes[2].set_ylabel("share")
    axes[2].set_xlabel("simulated time (s)")
    axes[2].set_title("utilization")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
