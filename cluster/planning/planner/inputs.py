"""What a plan is asked for: the model, the workload, SLOs, a quality
floor, the hardware on offer, a budget.

The workload is reduced to what the estimator reads (arrays of prompt and
output lengths, the cacheable prefix of each prompt, the peak and mean
request rates, and the rate curve over a period for cost) and to a window
of requests the simulator replays (the busiest stretch of a trace, or
synthetic arrivals at the peak rate).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitserve.cluster.planning.workload import (
    MASK64, Diurnal, PrefixSpec, TraceRequest, read_trace, synthetic)


class PlanInputError(ValueError):
    """A plan request that cannot be planned; the message says what to change."""


@dataclass(frozen=True)
class SLO:
    """Met when the ``ttft_pct`` percentile of TTFT is at most ``ttft_s`` and
    the ``tpot_pct`` percentile of TPOT at most ``tpot_s``, over every
    request (a failed request counts as infinitely late)."""

    ttft_s: float
    tpot_s: float
    ttft_pct: float = 90.0
    tpot_pct: float = 90.0

    def describe(self) -> str:
        return (f"TTFT p{self.ttft_pct:g} <= {self.ttft_s * 1e3:g} ms, "
                f"TPOT p{self.tpot_pct:g} <= {self.tpot_s * 1e3:g} ms")


@dataclass(frozen=True)
class Offer:
    """Devices of one kind that a plan may use: ``count`` of them (all pools
    together), at ``price`` per device-hour (None: the profile database's)."""

    key: str  # hardware key in the profile database, or "local" (this CPU)
    count: int
    price: float | None = None


def parse_offer(text: str) -> Offer:
    """``KEY[:COUNT[:PRICE]]``, e.g. ``h100-sxm:16:2.5``; ``local:4`` is four
    single-thread CPU replicas of this machine."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise PlanInputError(f"--hardware {text!r}: expected KEY[:COUNT[:PRICE]] (this "
                             "machine's CPU is 'local')")
    key, count, price = parts[0], 16, None
    try:
        if len(parts) >= 2 and parts[1]:
            count = int(parts[1])
        if len(parts) >= 3 and parts[2]:
            price = float(parts[2])
    except ValueError:
        raise PlanInputError(f"--hardware {text!r}: expected KEY[:COUNT[:PRICE]] with an "
                             "integer count and a price per device-hour") from None
    if count < 1 or (price is not None and price < 0):
        raise PlanInputError(f"--hardware {text!r}: count must be >= 1 and price >= 0")
    return Offer(key, count, price)


@dataclass
class WorkloadModel:
    inputs: np.ndarray  # prompt tokens of each sampled request
    outputs: np.ndarray  # output tokens
    cached: np.ndarray  # leading prompt tokens an earlier request shares (a perfect cache)
    peak_rate: float  # req/s the plan must meet the SLOs at
    mean_rate: float  # req/s averaged over the curve (for cost)
    curve: np.ndarray  # rate multiples of peak_rate over a period (sampled evenly)
    sim_requests: list[TraceRequest] = field(repr=False)  # what the simulator replays
    description: str = ""

    @property
    def steady(self) -> bool:
        return bool(np.all(self.curve >= 0.999))

    def summary(self) -> dict:
        i, o = self.inputs, self.outputs
        return {"description": self.description, "peak_rate": self.peak_rate,
                "mean_rate": self.mean_rate, "sampled_requests": int(len(i)),
                "simulated_requests": len(self.sim_requests),
                "input_mean": float(i.mean()), "input_p90": float(np.percentile(i, 90)),
                "output_mean": float(o.mean()), "output_p90": float(np.percentile(o, 90)),
                "cached_share": float(self.cached.sum() / max(1, i.sum())),
                "trough_over_peak": float(self.curve.min())}


def cacheable_tokens(reqs: list[TraceRequest]) -> np.ndarray:
    """Per request, the leading prompt tokens an earlier request shares
    (trace blocks chained as the engine's prefix cache chains them)."""
    seen: set[int] = set()
    out = np.zeros(len(reqs), dtype=np.int64)
    for k, r in enumerate(reqs):
        chain, hit, matching = 0, 0, True
        for b in r.hash_ids:
            chain = hash((chain, b)) & MASK64
            if matching and chain in seen:
                hit += r.block_tokens
            else:
                matching = False
                seen.add(chain)
        out[k] = min(hit, r.input_len - 1) if hit else 0
    return out


def from_requests(reqs: list[TraceRequest], description: str, window: int,
                  peak_window_s: float = 60.0) -> WorkloadModel:
    """The workload of these requests (arrival times from 0): lengths,
    cacheable prefixes, mean and peak rates, and the busiest ``window`` of
    them for the simulator."""
    if len(reqs) < 2:
        raise PlanInputError(f"{description}: needs at least 2 requests to estimate a rate")
    t = np.array([r.arrival_s for r in reqs])
    span = max(t[-1] - t[0], 1e-9)
    mean_rate = (len(reqs) - 1) / span
    # peak: the busiest stretch of `window` consecutive requests (at least peak_window_s long
    # when the trace allows), so the plan holds its SLOs there
    w = min(window, len(reqs))
    if w < len(reqs):
        k = w - 1
        spans = t[k:] - t[:-k]
        min_span = min(peak_window_s, span / 2)
        ok = spans >= min_span
        j = int(np.argmin(np.where(ok, spans, np.inf))) if ok.any() else 0
        peak_rate = k / max(spans[j], 1e-9)
    else:
        j, peak_rate = 0, mean_rate
    peak_rate = max(peak_rate, mean_rate)
    sim = [TraceRequest(r.arrival_s - reqs[j].arrival_s, r.input_len, r.output_len, r.hash_ids,
                        r.block_tokens) for r in reqs[j:j + w]]
    # the rate over a trace of an hour or more in 24 even bins (relative to the peak), for
    # what autoscaling saves; a shorter trace is one steady stretch
    if span >= 3600:
        bins = np.histogram(t, bins=24)[0] / (span / 24)
        curve = np.clip(bins / peak_rate, 0.0, 1.0)
    else:
        curve = np.ones(1)
    return WorkloadModel(np.array([r.input_len for r in reqs]),
                         np.array([r.output_len for r in reqs]), cacheable_tokens(reqs),
                         peak_rate, mean_rate, curve, sim, description)


def from_trace(path: str | Path, time_scale: float = 1.0, window: int = 800,
               limit: int = 200_000) -> WorkloadModel:
    reqs = []
    for r in read_trace(path, time_scale):
        reqs.append(r)
        if len(reqs) >= limit:
            break
    return from_requests(reqs, f"trace {path} (time scale {time_scale:g}, {len(reqs)} requests)",
                          window)


def from_bench_record(path: str | Path, run: int = -1, window: int = 800) -> WorkloadModel:
    """The requests a ``splitserve bench`` JSON record sent (one run of it):
    send times, prompt and output lengths as observed. A file of another
    shape fails naming the run and request row at fault."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
        rec = json.loads(text)
    except OSError as e:
        raise PlanInputError(f"{p}: cannot read the bench record: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PlanInputError(f"{p}: cannot read the bench record: not UTF-8 text (byte "
                             f"{e.object[e.start]:#04x})") from None
    except json.JSONDecodeError as e:
        raise PlanInputError(f"{p}: cannot read the bench record: not JSON: {e.msg} (line "
                             f"{e.lineno}, column {e.colno})") from None
    runs = rec.get("runs") if isinstance(rec, dict) else None
    if not runs:
        raise PlanInputError(f"{p}: not a splitserve bench record (no 'runs')")
    if not isinstance(runs, list):
        raise PlanInputError(f"{p}: 'runs' must be a list of runs, got {type(runs).__name__}")
    try:
        chosen = runs[run]
    except IndexError:
        raise PlanInputError(f"{p}: run {run} out of range ({len(runs)} runs)") from None
    if not isinstance(chosen, dict):
        raise PlanInputError(f"{p}: run {run} is not an object (got {type(chosen).__name__})")
    rows = chosen.get("requests") or []
    if not isinstance(rows, list):
        raise PlanInputError(f"{p}: run {run}: 'requests' must be a list of request rows")
    reqs = sorted((_bench_row(r, f"{p}: run {run}, request {i}") for i, r in enumerate(rows)),
                  key=lambda r: r.arrival_s)
    if len(reqs) < 2:
        raise PlanInputError(f"{p}: run {run} has {len(reqs)} request "
                             f"row{'' if len(reqs) == 1 else 's'}; a workload needs at least 2")
    t0 = reqs[0].arrival_s
    reqs = [TraceRequest(r.arrival_s - t0, r.input_len, r.output_len) for r in reqs]
    label = chosen.get("series", "")
    return from_requests(reqs, f"bench record {p} (run {run}{' ' + str(label) if label else ''}, "
                                f"{len(reqs)} requests)", window)


def _bench_row(row, where: str) -> TraceRequest:
    """One request row of a bench record (``send_time``, ``prompt_len``, and
    ``output_tokens`` received, else ``output_len`` asked for), arrival
    still absolute."""
    if not isinstance(row, dict):
        raise PlanInputError(f"{where}: not an object (got {type(row).__name__})")

    def number(key: str, integer: bool):
        if key not in row:
            raise PlanInputError(f"{where}: missing {key!r}")
        v = row[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if integer and not (ok and v == int(v) and v >= 0):
            raise PlanInputError(f"{where}: {key!r} must be an integer >= 0, got {v!r}")
        if not ok:
            raise PlanInputError(f"{where}: {key!r} must be a finite number, got {v!r}")
        return v

    send = float(number("send_time", False))
    prompt = int(number("prompt_len", True))
    out = int(number("output_tokens", True)) if row.get("output_tokens") else 0
    out = out or int(number("output_len", True))  # a failed request received none
    return TraceRequest(send, max(1, prompt), max(1, out))


def synthetic_workload(rate: float, input_len, output_len, *, burstiness: float = 1.0,
                       diurnal: Diurnal | None = None, prefix: PrefixSpec | None = None,
                       seed: int = 0, sample: int = 4000, window: int = 800,
                       description: str = "") -> WorkloadModel:
    """Lengths from the distributions; rates from ``rate`` (the mean) and the
    day curve: the plan holds its SLOs at the curve's peak and pays for the
    curve's mean."""
    peak = rate * (diurnal.peak if diurnal else 1.0)
    reqs = list(synthetic(peak, input_len, output_len, seed=seed, num_requests=max(sample, window),
                          burstiness=burstiness, prefix=prefix))
    if diurnal:
        ts = np.linspace(0, diurnal.period_s, 48, endpoint=False)
        curve = np.array([diurnal.factor(x) for x in ts]) / diurnal.peak
    else:
        curve = np.ones(1)
    return WorkloadModel(np.array([r.input_len for r in reqs]),
                         np.array([r.output_len for r in reqs]), cacheable_tokens(reqs),
                         peak, peak * float(curve.mean()), curve, reqs[:window], description)


def parse_slo(text: str, default_pct: float = 90.0) -> tuple[float, float]:
    """``0.5`` or ``0.5@p99`` (seconds, percentile) or ``500ms@p90``."""
    value, _, pct = text.partition("@")
    value = value.strip().lower()
    scale = 1e-3 if value.endswith("ms") else 1.0
    value = value[:-2] if value.endswith("ms") else value.rstrip("s")
    try:
        v = float(value) * scale
        p = float(pct.lstrip("pP")) if pct else default_pct
    except ValueError:
        raise PlanInputError(f"SLO {text!r}: expected SECONDS[@pPCT], e.g. 0.5@p90 or "
                             "50ms@p99") from None
    if v <= 0 or not 0 < p < 100:
        raise PlanInputError(f"SLO {text!r}: need a positive time and 0 < percentile < 100")
    return v, p


def z_of(pct: float) -> float:
    """The standard normal quantile of ``pct`` percent (Acklam's approximation)."""
    p = min(max(pct / 100.0, 1e-6), 1 - 1e-6)
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
         1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
         6.680131188771972e+01, -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
         -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
         3.754408661907416e+00)
    lo = 0.02425
    if p < lo:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - lo:
        return -z_of(100 * (1 - p))
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
