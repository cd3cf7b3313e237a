"""Rate sweeps: one run per offered rate, one after another.

Each run gets its own requests (``make_requests(run_index)``): sending the
same prompts again would hit the server's prefix cache and flatter every
run after the first."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable

from splitserve.cluster.bench.arrivals import ArrivalSpec
from splitserve.cluster.bench.datasets import BenchRequest
from splitserve.cluster.bench.runner import RunResult, Target, run_load
from splitserve.cluster.bench.stats import BenchStats, compute_stats


@dataclass
class SweepPoint:
    arrivals: ArrivalSpec
    stats: BenchStats
    result: RunResult

    @property
    def rate(self) -> float:
        return self.arrivals.rate


def parse_counts(text: str | int, runs: int) -> list[int]:
    """``--num-requests``: one count for every run, or one per run of the
    sweep (``"10,60"`` with two rates: a load step); raises ValueError."""
    try:
        counts = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--num-requests must be a count or one count per rate, got "
                         f"{text!r}") from None
    if len(counts) == 1:
        counts *= runs
    if len(counts) != runs or any(c < 1 for c in counts):
        raise ValueError(f"--num-requests {text!r}: give one positive count, or one per rate "
                         f"({runs})")
    return counts


def parse_rates(text: str) -> list[float]:
    """``"1,2,4"`` -> [1.0, 2.0, 4.0]; ``inf`` allowed; raises ValueError."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers (or inf), got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be positive request rates, got {text!r}")
    return rates


async def run_sweep(target: Target, make_requests: Callable[[int], list[BenchRequest]],
                    rates: list[float], base: ArrivalSpec, ttft_slo_s: float, tpot_slo_s: float,
                    progress: bool = False, request_timeout_s: float | None = None,
                    announce: bool = True) -> list[SweepPoint]:
    """One run per rate (``base`` gives burstiness, concurrency and seed)."""
    points = []
    for i, rate in enumerate(rates):
        spec = dataclasses.replace(base, rate=rate)
        requests = make_requests(i)
        if announce:
            print(f"run: {len(requests)} requests, {spec.describe()} -> {target.description}",
                  file=sys.stderr)
        result = await run_load(target, requests, spec, progress, request_timeout_s)
        stats = compute_stats(result.records, result.duration_s, ttft_slo_s, tpot_slo_s)
        points.append(SweepPoint(spec, stats, result))
    return points
