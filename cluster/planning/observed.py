"""A running cluster's workload, read from its Prometheus metrics.

``splitserve plan --observed http://HOST:PORT`` scrapes the cluster's
``/metrics`` twice, ``--observed-window`` seconds apart, and turns what changed into the
planner's workload: the arrival rate (requests ended, all outcomes, per
second) and the prompt and output lengths of the requests that finished,
from the deltas of their histograms (``splitserve_request_prompt_tokens``,
``splitserve_request_output_tokens``). Within a bucket lengths are drawn
log-uniformly, then scaled so their mean is the exact mean the histograms'
sums give (the buckets are vLLM's 1-2-5 steps, so a length is known to
within a factor of 2.5; the mean exactly). Arrivals are Poisson at the
observed rate.

Request metrics are counted by each ingress replica for its own requests.
With several replicas one ``/metrics`` answer of the API port is the
replica Serve's proxy picked for that scrape, so the counts of the others
are missing and two scrapes may even come from different replicas. Give
instead every node's Ray metrics endpoint (``--observed`` once per node):
each ingress replica's series (``ray_splitserve_*``, one per ``WorkerId``)
is on its own node's endpoint only, so the endpoints' counts are disjoint
and their sum (``merge_scrapes``) is the cluster's. Ray's histogram sums
are estimated from bucket midpoints, so the mean lengths are those
estimates there. Several URLs are summed the same way whatever they are:
each must count requests no other counts.

What a scrape cannot give: the prefix structure (the plan assumes no shared
prefixes beyond what the cache hit counters show, which it does not use),
and the rate curve over a day (one window is one steady stretch; plan from
a trace for a diurnal workload).
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.planning.planner.inputs import PlanInputError, WorkloadModel, from_requests
from splitserve.cluster.planning.workload import TraceRequest

PROMPT = "splitserve_request_prompt_tokens"
OUTPUT = "splitserve_request_output_tokens"
REQUESTS = "splitserve_requests"
RAY_PREFIX = "ray_"  # Ray's per-node endpoint exports the same metrics under this prefix
MAX_BODY = 64 << 20  # a /metrics answer larger than this is not ours


@dataclass
class Histogram:
    """One model's token-count histogram: cumulative counts at upper bounds."""

    bounds: list[float] = field(default_factory=list)  # ascending, the last is inf
    cumulative: list[float] = field(default_factory=list)
    sum: float = 0.0
    count: float = 0.0

    def add(self, bound: float, cumulative: float) -> None:
        """Add a bucket sample: series of one model (several processes) add up."""
        for i, b in enumerate(self.bounds):
            if b == bound:
                self.cumulative[i] += cumulative
                return
        self.bounds.append(bound)
        self.cumulative.append(cumulative)

    def plus(self, other: "Histogram") -> "Histogram":
        if self.bounds and other.bounds and other.bounds != self.bounds:
            raise PlanInputError("the metrics' histogram buckets differ between the endpoints")
        bounds = self.bounds or other.bounds
        a = self.cumulative or [0.0] * len(bounds)
        b = other.cumulative or [0.0] * len(bounds)
        return Histogram(list(bounds), [x + y for x, y in zip(a, b)], self.sum + other.sum,
                         self.count + other.count)

    def minus(self, earlier: "Histogram") -> "Histogram":
        if earlier.bounds and earlier.bounds != self.bounds:
            raise PlanInputError("the metrics' histogram buckets changed between the two scrapes")
        before = earlier.cumulative or [0.0] * len(self.cumulative)
        return Histogram(list(self.bounds), [a - b for a, b in zip(self.cumulative, before)],
                         self.sum - earlier.sum, self.count - earlier.count)


@dataclass
class Scrape:
    """What one ``/metrics`` answer says, per model."""

    time: float
    requests: dict[str, float]  # requests ended, all outcomes
    prompt: dict[str, Histogram]
    output: dict[str, Histogram]


def parse_metrics(text: str, at: float) -> Scrape:
    """The counters and histograms the planner reads, from exposition text:
    the API port's names, else Ray's (``ray_`` prefixed), summed over the
    series of each model (Ray's endpoint has one per process)."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise PlanInputError(f"the metrics are not Prometheus text: {e}") from None
    names = {s.name for fam in families for s in fam.samples}
    prefix = RAY_PREFIX if (f"{RAY_PREFIX}{REQUESTS}_total" in names
                            and f"{REQUESTS}_total" not in names) else ""
    requests: dict[str, float] = {}
    hists: dict[str, dict[str, Histogram]] = {PROMPT: {}, OUTPUT: {}}
    for fam in families:
        for s in fam.samples:
            model = s.labels.get("model")
            if model is None or not s.name.startswith(prefix):
                continue
            name = s.name[len(prefix):]
            if name == f"{REQUESTS}_total":
                requests[model] = requests.get(model, 0.0) + s.value
                continue
            for base, by_model in hists.items():
                if not name.startswith(base + "_"):
                    continue
                h = by_model.setdefault(model, Histogram())
                suffix = name[len(base) + 1:]
                if suffix == "bucket":
                    h.add(float(s.labels["le"]), s.value)
                elif suffix == "sum":
                    h.sum += s.value
                elif suffix == "count":
                    h.count += s.value
    for by_model in hists.values():
        for h in by_model.values():
            order = sorted(range(len(h.bounds)), key=h.bounds.__getitem__)
            h.bounds = [h.bounds[i] for i in order]
            h.cumulative = [h.cumulative[i] for i in order]
    return Scrape(at, requests, hists[PROMPT], hists[OUTPUT])


def merge_scrapes(scrapes: list[Scrape]) -> Scrape:
    """The sum of scrapes of endpoints that count disjoint requests (every
    node's Ray endpoint, taken back to back), at their mean time."""
    if not scrapes:
        raise PlanInputError("no metrics endpoint to observe")
    requests: dict[str, float] = {}
    prompt: dict[str, Histogram] = {}
    output: dict[str, Histogram] = {}
    for sc in scrapes:
        for m, n in sc.requests.items():
            requests[m] = requests.get(m, 0.0) + n
        for mine, theirs in ((prompt, sc.prompt), (output, sc.output)):
            for m, h in theirs.items():
                mine[m] = mine[m].plus(h) if m in mine else h
    return Scrape(sum(sc.time for sc in scrapes) / len(scrapes), requests, prompt, output)


def scrape_all(urls: list[str], api_key: str | None = None) -> Scrape:
    """Every endpoint of ``urls`` scraped back to back, summed."""
    if len(set(u.rstrip("/") for u in urls)) != len(urls):
        raise PlanInputError("an --observed URL is given twice: its requests would count twice")
    return merge_scrapes([scrape(u, api_key) for u in urls])


def scrape(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> Scrape:
    """GET ``url``/metrics (``url`` may name /metrics itself)."""
    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    req = urllib.request.Request(target, headers={"Accept": "text/plain"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as e:
        hint = " (pass --api-key or set SPLITSERVE_API_KEY)" if e.code == 401 else ""
        raise PlanInputError(f"{target}: HTTP {e.code}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PlanInputError(f"{target}: cannot scrape the metrics: {reason}") from None
    if len(body) > MAX_BODY:
        raise PlanInputError(f"{target}: the answer exceeds {MAX_BODY >> 20} MiB")
    return parse_metrics(body.decode("utf-8", errors="replace"), time.time())


class BucketLengths:
    """Lengths drawn from a token-count histogram (the ``sample`` interface
    of ``splitserve.cluster.bench.datasets.LengthDist``)."""

    def __init__(self, hist: Histogram, what: str):
        lows = [0.0] + hist.bounds[:-1]
        self.ranges: list[tuple[float, float]] = []
        weights: list[float] = []
        prev = 0.0
        for lo, hi, cum in zip(lows, hist.bounds, hist.cumulative):
            n = cum - prev
            prev = cum
            if n <= 0:
                continue
            hi = hi if math.isfinite(hi) else max(2.0 * lo, lo + 1.0)
            self.ranges.append((max(1.0, math.floor(lo) + 1.0), max(1.0, math.floor(hi))))
            weights.append(n)
        if not weights:
            raise PlanInputError(f"no {what} lengths were observed")
        self.p = np.array(weights) / sum(weights)
        self.mean = hist.sum / hist.count

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        k = rng.choice(len(self.ranges), size=n, p=self.p)
        lo = np.array([self.ranges[i][0] for i in k])
        hi = np.array([self.ranges[i][1] for i in k])
        x = np.exp(rng.uniform(np.log(lo), np.log(hi + 1.0)))  # log-uniform in [lo, hi + 1)
        x = np.clip(np.floor(x), lo, hi)
        if x.mean() > 0:  # the exact mean, each length kept within its bucket
            x = np.clip(np.rint(x * self.mean / x.mean()), lo, hi)
        return [int(v) for v in x]


def workload_from_scrapes(before: Scrape, after: Scrape, model: str | None, window: int,
                          seed: int = 0, sample: int = 4000) -> tuple[WorkloadModel, str]:
    """The workload between two scrapes (and the model it is of: ``model``,
    or the only one with traffic)."""
    dt = after.time - before.time
    if dt <= 0:
        raise PlanInputError("the second scrape must come after the first")
    ended = {m: n - before.requests.get(m, 0.0) for m, n in after.requests.items()}
    busy = sorted(m for m, n in ended.items() if n > 0)
    if model is None:
        if len(busy) != 1:
            raise PlanInputError("requests of several models were observed "
                                 f"({', '.join(busy)}): name one with --observed-model"
                                 if busy else f"no request ended in the {dt:.0f} s observed")
        model = busy[0]
    if ended.get(model, 0.0) < 2:
        raise PlanInputError(f"model {model!r}: {ended.get(model, 0.0):.0f} requests ended in the "
                             f"{dt:.0f} s observed; observe longer (--observed-window)")
    dists = []
    for what, hists in (("prompt", (before.prompt, after.prompt)),
                        ("output", (before.output, after.output))):
        if model not in hists[1]:
            raise PlanInputError(f"model {model!r}: the metrics have no {what} length histogram")
        delta = hists[1][model].minus(hists[0].get(model, Histogram()))
        if delta.count <= 0:
            raise PlanInputError(f"model {model!r}: no request finished in the {dt:.0f} s "
                                 "observed; observe longer (--observed-window)")
        dists.append(BucketLengths(delta, what))
    rate = ended[model] / dt
    rng = np.random.default_rng(seed)
    n = max(sample, window)
    gaps = rng.exponential(1.0 / rate, size=n)
    ins, outs = dists[0].sample(n, rng), dists[1].sample(n, rng)
    t = np.cumsum(gaps) - gaps[0]
    reqs = [TraceRequest(float(t[i]), int(ins[i]), int(outs[i])) for i in range(n)]
    desc = (f"observed {model!r}: {ended[model]:.0f} requests in {dt:.0f} s ({rate:.3g} req/s), "
            f"mean prompt {dists[0].mean:.0f} and output {dists[1].mean:.0f} tokens")
    return from_requests(reqs, desc, window), model
