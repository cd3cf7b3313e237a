"""What a simulation records: per-request latencies, token gaps, and each
pool's state over time; and the summary docs/benchmarks.md defines
(TTFT, TPOT, ITL, E2E, goodput, SLO attainment), plus GPU-hours and cost.

Per request, on the client's clock (arrival at the ingress):
  TTFT = first token delivered - arrival; E2E = last token - arrival;
  TPOT = (last - first) / (output tokens - 1).
ITL is pooled over every decoded token as a log-binned histogram (each
coalesced run adds its mean step time once per token it produced), so a
day of traffic needs no per-token storage.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np

from splitserve.cluster.bench.stats import PERCENTILES, Summary


class LogHistogram:
    """Counts in bins of 1% width from 1 us to 1e4 s."""

    LO, BINS_PER_DECADE, DECADES = 1e-6, 230, 10

    def __init__(self):
        self.counts = np.zeros(self.BINS_PER_DECADE * self.DECADES + 1, dtype=np.int64)
        self.total = 0
        self.sum = 0.0

    def add(self, seconds: float, count: int) -> None:
        if count <= 0:
            return
        i = int(math.log10(max(seconds, self.LO) / self.LO) * self.BINS_PER_DECADE)
        self.counts[min(i, len(self.counts) - 1)] += count
        self.total += count
        self.sum += seconds * count

    def value(self, i: int) -> float:
        return self.LO * 10 ** ((i + 0.5) / self.BINS_PER_DECADE)

    def summary(self) -> Summary:
        if not self.total:
            return Summary.of([])
        cum = np.cumsum(self.counts)
        ps = [self.value(int(np.searchsorted(cum, q / 100 * self.total))) for q in PERCENTILES]
        return Summary(self.sum / self.total, ps[0], ps[1], ps[2], int(self.total))


@dataclass
class RequestLog:
    """Per-request columns (compact arrays: a day of requests fits)."""

    arrival: array = field(default_factory=lambda: array("d"))
    prompt_len: array = field(default_factory=lambda: array("l"))
    output_len: array = field(default_factory=lambda: array("l"))
    ttft: array = field(default_factory=lambda: array("d"))  # nan: failed
    e2e: array = field(default_factory=lambda: array("d"))
    tpot: array = field(default_factory=lambda: array("d"))  # nan: < 2 tokens or failed
    local: array = field(default_factory=lambda: array("b"))  # prefilled on the decode replica
    retries: array = field(default_factory=lambda: array("l"))
    errors: dict = field(default_factory=dict)

    def add(self, arrival: float, prompt_len: int, output_len: int, first: float | None,
            last: float | None, tokens: int, local: bool, retries: int,
            error: str | None) -> None:
        nan = float("nan")
        self.arrival.append(arrival)
        self.prompt_len.append(prompt_len)
        self.output_len.append(output_len)
        self.local.append(1 if local else 0)
        self.retries.append(retries)
        if error is not None or first is None or last is None:
            self.errors[error or "no output"] = self.errors.get(error or "no output", 0) + 1
            self.ttft.append(nan)
            self.e2e.append(nan)
            self.tpot.append(nan)
            return
        self.ttft.append(first - arrival)
        self.e2e.append(last - arrival)
        self.tpot.append((last - first) / (tokens - 1) if tokens > 1 else nan)

    def __len__(self) -> int:
        return len(self.arrival)


@dataclass
class PoolSample:
    t: float
    target: int
    ready: int
    starting: int
    draining: int
    busy: float  # mean busy fraction of ready replicas since the last sample
    kv_used: float  # mean share of KV blocks in use
    waiting: int  # sequences queued in the engines
    pending_prompt_tokens: int
    running: int
    decision: str = ""


def summarize(log: RequestLog, itl: LogHistogram, duration_s: float, ttft_slo: float,
              tpot_slo: float) -> dict:
    ttft = np.frombuffer(log.ttft, dtype=np.float64) if len(log) else np.zeros(0)
    e2e = np.frombuffer(log.e2e, dtype=np.float64) if len(log) else np.zeros(0)
    tpot = np.frombuffer(log.tpot, dtype=np.float64) if len(log) else np.zeros(0)
    outs = np.frombuffer(log.output_len, dtype=np.int64) if len(log) else np.zeros(0, np.int64)
    ok = ~np.isnan(ttft)
    good = ok & (ttft <= ttft_slo) & (np.isnan(tpot) | (tpot <= tpot_slo))
    n = len(log)
    dur = max(duration_s, 1e-9)
    return {
        "num_requests": n, "completed": int(ok.sum()), "failed": int(n - ok.sum()),
        "duration_s": duration_s,
        "request_throughput": float(ok.sum()) / dur,
        "output_throughput": float(outs[ok].sum()) / dur,
        "goodput": float(good.sum()) / dur,
        "slo_attainment": float(good.sum()) / n if n else float("nan"),
        "ttft_slo_s": ttft_slo, "tpot_slo_s": tpot_slo,
        "ttft": Summary.of(ttft[ok].tolist()).__dict__,
        "tpot": Summary.of(tpot[ok & ~np.isnan(tpot)].tolist()).__dict__,
        "itl": itl.summary().__dict__,
        "e2e": Summary.of(e2e[ok].tolist()).__dict__,
        "local_prefill_share": float(np.frombuffer(log.local, dtype=np.int8)[ok].mean())
        if ok.any() else float("nan"),
        "errors": dict(log.errors),
    }
