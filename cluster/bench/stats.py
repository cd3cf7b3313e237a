"""Serving statistics of one run, as docs/benchmarks.md defines them.

Per request (client clock, seconds):
  TTFT = first output received - request sent
  TPOT = (last output - first output) / (output tokens - 1), for requests
         with more than one output token
  ITL  = gaps between consecutive streamed outputs (pooled over requests)
  E2E  = last output - request sent
Per run, over ``duration_s`` (the arrival schedule's start to the last request's end):
  request throughput = completed / duration
  output token throughput = output tokens of completed requests / duration
  goodput = completed requests meeting both SLOs (TTFT <= ttft_slo and
            TPOT <= tpot_slo; a one-token request has no TPOT and meets it)
            / duration
  SLO attainment = those requests / all requests sent (failures miss)
Summaries: mean, p50, p90, p99 (numpy's linear interpolation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from splitserve.cluster.bench.phases import (
    PHASES,
    TTFT_PARTS,
    has_phase_timings,
    phase_breakdown,
    ttft_breakdown,
)

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the runner saw of one request."""

    index: int
    prompt_len: int
    output_len: int  # max_tokens asked for
    send_time: float = 0.0  # seconds after the run's start
    chunk_times: list[float] = field(default_factory=list)  # each output's arrival
    output_tokens: int = 0
    error: str | None = None
    timings: dict | None = None  # the server's phase timings, when it sends them

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.send_time

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass(frozen=True)
class Summary:
    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @staticmethod
    def of(values: list[float]) -> "Summary":
        if not values:
            return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        a = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
        return Summary(float(a.mean()), p50, p90, p99, len(values))


@dataclass(frozen=True)
class BenchStats:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests/s
    output_throughput: float  # output tokens/s
    goodput: float  # requests/s meeting both SLOs
    slo_attainment: float  # share of all requests meeting both SLOs
    ttft_slo_s: float
    tpot_slo_s: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    phases: dict[str, float]  # mean seconds per phase (queue, prefill, handoff, decode)
    ttft_parts: dict[str, float]  # mean seconds of queue, prefill, transfer, first_token
    errors: dict[str, int]  # error message (first 80 characters) -> count

    def to_dict(self) -> dict:
        return asdict(self)


def meets_slo(r: RequestRecord, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    if not r.ok or r.ttft > ttft_slo_s:
        return False
    tpot = r.tpot
    return tpot is None or tpot <= tpot_slo_s


def compute_stats(records: list[RequestRecord], duration_s: float, ttft_slo_s: float,
                  tpot_slo_s: float) -> BenchStats:
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    good = sum(1 for r in done if meets_slo(r, ttft_slo_s, tpot_slo_s))
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "no output")[:80]
            errors[key] = errors.get(key, 0) + 1
    timed = [r for r in done if has_phase_timings(r.timings)]
    phases = {p: float(np.mean([phase_breakdown(r.ttft, r.e2e, r.timings)[p] for r in timed]))
              if timed else float("nan") for p in PHASES}
    parts = {p: float(np.mean([ttft_breakdown(r.ttft, r.timings)[p] for r in timed]))
             if timed else float("nan") for p in TTFT_PARTS}
    return BenchStats(
        num_requests=len(records), completed=len(done), failed=len(records) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        output_throughput=sum(r.output_tokens for r in done) / duration_s,
        goodput=good / duration_s,
        slo_attainment=good / len(records) if records else float("nan"),
        ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
        ttft=Summary.of([r.ttft for r in done]),
        tpot=Summary.of([t for r in done if (t := r.tpot) is not None]),
        itl=Summary.of([g for r in done for g in r.itls()]),
        e2e=Summary.of([r.e2e for r in done]),
        phases=phases, ttft_parts=parts, errors=errors)
