"""Bench results out: text tables, a JSON record and a PNG plot.

``table`` aligns any rows under a header (the benchmark scripts print with
it). The sweep table has one column per run (rate) and one row per metric,
latencies in milliseconds. The JSON record holds the configuration, each
run's statistics and every request's measurements (write it with
``record.write_json``). The plot shows latency percentiles and goodput
against the offered rate (the achieved request rate for an unpaced run),
one line per labelled series.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from splitserve.cluster.bench.record import record_header
from splitserve.cluster.bench.stats import BenchStats
from splitserve.cluster.bench.sweep import SweepPoint

MS = 1000.0


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Columns left-aligned under ``header`` and a rule; floats to 3 decimals."""
    cols = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rate_label(p: SweepPoint) -> str:
    a = p.arrivals
    label = "unpaced" if math.isinf(a.rate) else f"{a.rate:g} req/s"
    return label + (f" c={a.concurrency}" if a.concurrency else "")


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * MS:.1f}"


def stats_rows(s: BenchStats) -> list[tuple[str, str]]:
    rows = [("requests ok / failed", f"{s.completed} / {s.failed}"),
            ("duration (s)", f"{s.duration_s:.2f}"),
            ("request throughput (req/s)", f"{s.request_throughput:.2f}"),
            ("output throughput (tok/s)", f"{s.output_throughput:.1f}"),
            (f"goodput (req/s, TTFT<={s.ttft_slo_s * MS:.3g}ms TPOT<={s.tpot_slo_s * MS:.3g}ms)",
             f"{s.goodput:.2f}"),
            ("SLO attainment (%)", f"{100 * s.slo_attainment:.1f}")]
    for name, summ in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        rows.append((f"{name} mean / p50 / p90 / p99 (ms)",
                     " / ".join(_ms(v) for v in (summ.mean, summ.p50, summ.p90, summ.p99))))
    if not math.isnan(s.phases["queue"]):
        rows.append(("phases queue / prefill / handoff / decode (ms, mean)",
                     " / ".join(_ms(s.phases[k]) for k in ("queue", "prefill", "handoff", "decode"))))
    return rows


def format_table(columns: dict[str, BenchStats]) -> str:
    """Metrics down, one column per labelled run."""
    cols = {label: dict(stats_rows(s)) for label, s in columns.items()}
    names: list[str] = []
    for c in cols.values():
        names += [n for n in c if n not in names]
    return table([[n] + [c.get(n, "-") for c in cols.values()] for n in names],
                 ["metric"] + list(cols))


def sweep_table(points: list[SweepPoint]) -> str:
    return format_table({_rate_label(p): p.stats for p in points})


def record(series: dict[str, list[SweepPoint]], config: dict[str, Any],
           with_requests: bool = True) -> dict[str, Any]:
    """A JSON-able record of every run of every series."""
    runs = []
    for label, points in series.items():
        for p in points:
            run: dict[str, Any] = {"series": label, "rate": p.rate,
                                   "burstiness": p.arrivals.burstiness,
                                   "concurrency": p.arrivals.concurrency,
                                   "started_at": p.result.started_at,
                                   "stats": p.stats.to_dict()}
            if with_requests:
                run["requests"] = [
                    {"index": r.index, "prompt_len": r.prompt_len, "output_len": r.output_len,
                     "send_time": r.send_time, "ttft": r.ttft if r.ok else None,
                     "e2e": r.e2e if r.ok else None, "output_tokens": r.output_tokens,
                     "chunk_times": r.chunk_times, "timings": r.timings, "error": r.error}
                    for r in p.result.records]
            runs.append(run)
    return {**record_header("splitserve-bench"), "config": config, "runs": runs}


def _x(p: SweepPoint) -> float:
    return p.stats.request_throughput if math.isinf(p.rate) else p.rate


def plot(series: dict[str, list[SweepPoint]], path: str | Path,
         title: str = "splitserve bench") -> None:
    """Latency percentiles (TTFT, TPOT) and goodput against the request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    for i, (label, points) in enumerate(series.items()):
        xs = [_x(p) for p in points]
        color = f"C{i}"
        for ax, metric in ((axes[0], "ttft"), (axes[1], "tpot")):
            for q, ls in styles.items():
                ys = [getattr(getattr(p.stats, metric), q) * MS for p in points]
                ax.plot(xs, ys, ls, marker="o", color=color, label=f"{label} {q}")
        axes[2].plot(xs, [p.stats.goodput for p in points], "-", marker="o", color=color,
                     label=f"{label} goodput")
        axes[2].plot(xs, [p.stats.request_throughput for p in points], "--", marker="x",
                     color=color, label=f"{label} throughput")
    first = next(iter(series.values()))[0].stats
    axes[0].axhline(first.ttft_slo_s * MS, color="grey", lw=0.8, label="TTFT SLO")
    axes[1].axhline(first.tpot_slo_s * MS, color="grey", lw=0.8, label="TPOT SLO")
    for ax, ylabel in zip(axes, ("TTFT (ms)", "TPOT (ms)", "requests/s")):
        ax.set_xlabel("request rate (req/s; achieved when unpaced)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
