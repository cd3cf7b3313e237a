"""splitserve's Prometheus metrics: their definitions and the calls that record them.

Every metric is declared once in ``METRICS`` (``splitserve.cluster.observability.metric_defs``).
Every value goes to ``PROCESS_REGISTRY`` (prometheus_client: exact counts
and sums, ``_total`` after counters), from which /metrics of the HTTP port
serves the ingress's request metrics and the router's metrics
(``splitserve.cluster.observability.exposition``). Inside a Ray process (a
Serve replica, the router actor, a driver after ``ray.init``) values also
go through ``ray.util.metrics`` and Ray's per-node endpoint exports them,
with Ray's naming: a ``ray_`` prefix, ``_total`` after counters, extra
labels (``WorkerId``, ``NodeAddress``, ...), and histogram sums estimated
from bucket midpoints.

Who records what:
  ClusterBackend, LocalBackend (per request, label model): TTFT/TPOT/ITL/
    E2E, phase durations, hand-off bytes, outcomes, finish reasons, prompt,
    cached and output tokens, retries, fallbacks, refusals
                                               -> ``RequestRecorder``, ``record_*``
  WorkerServer.push_stats (labels model, role) -> ``record_worker_metrics``
  RouterActor (label model)                    -> ``RouterMetrics``
  the autoscaler (labels model, pool)          -> ``record_autoscaler_decision``
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from typing import Any, Callable, Mapping, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as _PCounter
from prometheus_client import Gauge as _PGauge
from prometheus_client import Histogram as _PHistogram

from splitserve.cluster.api.errors import Overloaded, Unavailable
from splitserve.cluster.autoscaling.records import DecisionRecord
from splitserve.cluster.bench.phases import phase_breakdown
from splitserve.cluster.observability.metric_defs import METRICS, MetricDef
from splitserve.engine.errors import InvalidRequestError
from splitserve.engine.roles import Role
from splitserve.engine.stats import DecodeStats, WorkerStats
from splitserve.router.reports import ReplicaInfo

__all__ = ["METRICS", "MetricDef", "PROCESS_REGISTRY", "RequestRecorder", "RouterMetrics",
           "decision_labels", "record", "record_autoscaler_decision", "record_retry",
           "record_worker_metrics", "render_prometheus", "replica_values"]

log = logging.getLogger("splitserve.metrics")
PROCESS_REGISTRY = CollectorRegistry()
_METHOD = {"counter": "inc", "gauge": "set", "histogram": "observe"}


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to learn it is not in use
    return ray is not None and ray.is_initialized()


class _Metric:
    """One metric, recorded through Ray when connected, else prometheus_client."""

    def __init__(self, d: MetricDef):
        self.d = d
        self._ray: Any = None
        self._prom: Any = None

    def _ray_metric(self):
        if self._ray is None:
            from ray.util import metrics as rm

            d = self.d
            cls = {"counter": rm.Counter, "gauge": rm.Gauge, "histogram": rm.Histogram}[d.kind]
            kw = {"boundaries": list(d.buckets)} if d.kind == "histogram" else {}
            self._ray = cls(d.name, description=d.description, tag_keys=d.tags, **kw)
        return self._ray

    def _prom_metric(self, tags: dict[str, str]):
        if self._prom is None:
            d = self.d
            cls = {"counter": _PCounter, "gauge": _PGauge, "histogram": _PHistogram}[d.kind]
            kw = {"buckets": d.buckets} if d.kind == "histogram" else {}
            self._prom = cls(d.name, d.description, list(d.tags), registry=PROCESS_REGISTRY, **kw)
        return self._prom.labels(**tags)

    def record(self, value: float, tags: dict[str, str]) -> None:
        kind = self.d.kind
        if kind == "counter" and value <= 0:
            return  # counters only go up; a zero increment is nothing to record
        method = _METHOD[kind]
        getattr(self._prom_metric(tags), method)(value)
        if _ray_connected():
            getattr(self._ray_metric(), method)(value, tags=tags)


_live: dict[str, _Metric] = {name: _Metric(d) for name, d in METRICS.items()}


def record(name: str, value: float, **tags: str) -> None:
    """Increment a counter, set a gauge or observe a histogram value."""
    try:
        m = _live[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a splitserve metric; add it to METRICS") from None
    m.record(float(value), tags)


def render_prometheus() -> bytes:
    """This process's metrics in the text exposition format."""
    return generate_latest(PROCESS_REGISTRY)


F = TypeVar("F", bound=Callable[..., Any])
_warned: set[str] = set()


def _never_raises(fn: F) -> F:
    """Recording runs inside the request path and the stats push: a metrics
    fault is logged (once per function) instead of failing either."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - see the docstring
            if fn.__qualname__ not in _warned:
                _warned.add(fn.__qualname__)
                log.warning("recording metrics in %s failed", fn.__qualname__, exc_info=True)
    return wrapper  # type: ignore[return-value]


# -- cumulative counts -> counter increments ------------------------------------
_last_totals: dict[tuple, float] = {}


def _advance(name: str, total: float, **tags: str) -> None:
    """Count the increase of a cumulative total a component reports."""
    key = (name, *sorted(tags.items()))
    last = _last_totals.get(key, 0.0)
    _last_totals[key] = total
    # a smaller total means the component restarted: its whole total is new
    record(name, total - last if total >= last else total, **tags)


# -- per request (ClusterBackend) -----------------------------------------------------
class RequestRecorder:
    """One request's clock in the backend: feed it every output dict, then
    ``finish`` once, with the exception that ended the request if any."""

    def __init__(self, model: str, clock=time.monotonic):
        self.model = model
        self._clock = clock
        self.start = clock()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.timings: dict | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.prompt_tokens = 0  # as the last output counted them
        self.cached_tokens = 0

    @_never_raises
    def on_output(self, d: dict) -> None:
        now = self._clock()
        if self.timings is None and d.get("timings") is not None:
            self.timings = d["timings"]  # the first replica's; a resumed request keeps these
            if self.timings.get("fallback_reason"):
                record("splitserve_fallbacks", 1, model=self.model)
        self.prompt_tokens = d.get("prompt_tokens") or self.prompt_tokens
        self.cached_tokens = d.get("cached_tokens") or self.cached_tokens
        n = len(d.get("token_ids") or ())
        if n:
            if self.first is None:
                self.first = now
            else:
                record("splitserve_itl_seconds", now - self.last, model=self.model)
            self.last = now
            self.tokens += n
        if d.get("finished"):
            self.finished = True
            self.finish_reason = d.get("finish_reason")

    def _outcome(self, error: BaseException | None) -> str:
        if error is None or isinstance(error, (GeneratorExit, asyncio.CancelledError)):
            return "cancelled"
        if isinstance(error, (Overloaded, Unavailable, InvalidRequestError)) and self.first is None:
            return "refused"
        return "failed"

    @_never_raises
    def finish(self, error: BaseException | None = None) -> None:
        m = self.model
        record("splitserve_output_tokens", self.tokens, model=m)
        record("splitserve_prompt_tokens", self.prompt_tokens, model=m)
        record("splitserve_cached_prompt_tokens", self.cached_tokens, model=m)
        if not self.finished:  # an error after the last output changes nothing
            outcome = self._outcome(error)
            if outcome == "refused":
                reason = ("overloaded" if isinstance(error, Overloaded)
                          else "invalid" if isinstance(error, InvalidRequestError)
                          else "unavailable")
                record("splitserve_refusals", 1, model=m, reason=reason)
            record("splitserve_requests", 1, model=m, outcome=outcome)
            return
        record("splitserve_requests", 1, model=m, outcome="finished")
        record("splitserve_finished_requests", 1, model=m,
               finish_reason=self.finish_reason or "unknown")
        record("splitserve_request_prompt_tokens", self.prompt_tokens, model=m)
        record("splitserve_request_output_tokens", self.tokens, model=m)
        if self.first is None:
            return  # finished without a token (e.g. max_tokens reached by a resume)
        ttft, e2e = self.first - self.start, self.last - self.start
        record("splitserve_ttft_seconds", ttft, model=m)
        record("splitserve_e2e_seconds", e2e, model=m)
        if self.tokens > 1:
            record("splitserve_tpot_seconds", (self.last - self.first) / (self.tokens - 1), model=m)
        for phase, secs in phase_breakdown(ttft, e2e, self.timings).items():
            record("splitserve_request_phase_seconds", secs, model=m, phase=phase)
        if self.timings and self.timings.get("mode") == "remote" and self.timings.get("bytes"):
            record("splitserve_handoff_request_bytes", self.timings["bytes"], model=m)
            record("splitserve_handoff_bytes", self.timings["bytes"], model=m)


@_never_raises
def record_retry(model: str, resumed: bool) -> None:
    record("splitserve_retries", 1, model=model, kind="resumed" if resumed else "replaced")


# -- per replica (WorkerServer.push_stats) ---------------------------------------------
def replica_values(s: WorkerStats) -> dict[str, float]:
    """The replica metrics of one stats snapshot: gauges as they are now,
    counters as cumulative totals since the replica started."""
    e = s.engine
    values = {"splitserve_pending_prompt_tokens": e.pending_prompt_tokens,
              "splitserve_running_seqs": e.running, "splitserve_waiting_requests": e.waiting,
              "splitserve_preemptions": e.preemptions,
              "splitserve_prefix_cache_queries": e.prefix_queries,
              "splitserve_prefix_cache_hits": e.prefix_hits}
    if e.spec_drafts:  # only replicas that speculate report these series
        values.update({"splitserve_spec_decode_drafts": e.spec_drafts,
                       "splitserve_spec_decode_draft_tokens": e.spec_draft_tokens,
                       "splitserve_spec_decode_accepted_tokens": e.spec_accepted_tokens,
                       "splitserve_spec_decode_draft_seconds": e.spec_draft_time_s})
    if e.total_blocks:
        values["splitserve_kv_cache_usage_ratio"] = (e.total_blocks - e.free_blocks) / e.total_blocks
        values["splitserve_kv_cache_blocks"] = e.total_blocks
    if e.lora_slots:
        values["splitserve_lora_slots"] = e.lora_slots
        values["splitserve_lora_slots_in_use"] = e.lora_slots_in_use
    if isinstance(s, DecodeStats):
        values["splitserve_replica_refusals"] = s.refused
        values["splitserve_replica_fallbacks"] = s.fallbacks
    return values


@_never_raises
def record_worker_metrics(role: Role, model: str, s: WorkerStats) -> None:
    """Gauges and counters from one ``worker.stats()`` snapshot of this replica."""
    tags = {"model": model, "role": role.value}
    for name, value in replica_values(s).items():
        if METRICS[name].kind == "counter":
            _advance(name, value, **tags)
        else:
            record(name, value, **tags)


# -- router (RouterActor) ------------------------------------------------------------------
class RouterMetrics:
    """The router's counters as metrics. ``publish`` (rate-limited) sets the
    in-flight and per-pool replica gauges from the router's state, and
    records the placements and refusals counted since (``count_*``: a
    metric call per decision would cost the router as much as the decision)."""

    def __init__(self, period_s: float = 1.0, clock=time.monotonic):
        self.period_s = period_s
        self._clock = clock
        self._next = 0.0
        self._pools: set[tuple[str, str]] = set()
        self._placed: dict[tuple[str, str], int] = {}
        self._refused: dict[tuple[str, str], int] = {}
        self.models: set[str] | None = None  # gauges of these models only; None: all

    def count_placement(self, model: str, reason: str) -> None:
        key = (model, reason)
        self._placed[key] = self._placed.get(key, 0) + 1

    def count_rejection(self, model: str, reason: str) -> None:
        key = (model, reason)
        self._refused[key] = self._refused.get(key, 0) + 1

    @_never_raises
    def on_placement(self, model: str, reason: str) -> None:
        record("splitserve_router_decisions", 1, model=model, reason=reason)

    @_never_raises
    def on_rejection(self, model: str, reason: str) -> None:
        record("splitserve_router_rejections", 1, model=model, reason=reason)

    @_never_raises
    def publish(self, router, replicas: Mapping[str, ReplicaInfo], force: bool = False) -> None:
        """``router``: a RouterService (or a bare RouterCore); ``replicas``:
        who each replica it holds stats of is (its role labels the pool)."""
        now = self._clock()
        if not force and now < self._next:
            return
        self._next = now + self.period_s
        placed, refused, self._placed, self._refused = self._placed, self._refused, {}, {}
        for (model, reason), n in placed.items():
            record("splitserve_router_decisions", n, model=model, reason=reason)
        for (model, reason), n in refused.items():
            record("splitserve_router_rejections", n, model=model, reason=reason)
        core = getattr(router, "core", router)
        mine = self.models
        if core is not router:  # the service's queue and lease accounting
            waits = router.oldest_wait_s()
            for model, n in router.queued().items():
                if mine is not None and model not in mine:
                    continue
                record("splitserve_router_queued", n, model=model)
                record("splitserve_router_queue_wait_seconds", waits[model], model=model)
            for event, key in (("expired", "leases_expired"), ("reclaimed", "leases_reclaimed"),
                               ("unbalanced_release", "unbalanced_releases"),
                               ("adopted", "leases_adopted")):
                _advance("splitserve_router_lease_events", router.counts[key], event=event)
        counts: dict[tuple[str, str], int] = {}
        for model, n in core.counters().in_flight.items():
            if mine is not None and model not in mine:
                continue
            record("splitserve_router_in_flight", n, model=model)
            snap = core.snapshot(model)
            for r in (*snap.prefill, *snap.decode):
                key = (model, replicas[r.replica_id].role.value)
                counts[key] = counts.get(key, 0) + 1
        for key in self._pools - counts.keys():
            counts[key] = 0  # a pool that lost its last replica reads 0, not its old count
        for (model, pool), n in counts.items():
            record("splitserve_pool_replicas", n, model=model, pool=pool)
        self._pools |= counts.keys()


# -- autoscaler -------------------------------------------------------------------------------
_last_decision: dict[tuple[str, str], dict[str, str]] = {}


def decision_labels(rec: DecisionRecord) -> dict[str, str]:
    """Bounded labels of one autoscaling decision record (the free-text
    reason stays in the ops ledger): decision up/down/hold, and reason
    no_metrics (nothing to decide on), bounds (min/max changed), scaled
    (target changed now), delayed (the load wants a change that waits for
    its delay or cooldown) or on_target."""
    current, target = rec.current, rec.target
    decision = "up" if target > current else "down" if target < current else "hold"
    if rec.value is None:
        reason = "bounds" if target != current else "no_metrics"
    elif target != current:
        reason = "scaled"
    elif rec.desired != target:
        reason = "delayed"
    else:
        reason = "on_target"
    return {"bottleneck": rec.bottleneck, "decision": decision, "reason": reason}


@_never_raises
def record_autoscaler_decision(rec: DecisionRecord) -> None:
    """One pool's latest decision, as ``splitserve.cluster.autoscaling.serve_policy.
    decision_record`` builds it ({model, role, bottleneck, current, target,
    desired, value, reason, ...}). The previous decision's series drops to 0
    so exactly one series per pool reads 1."""
    model, pool = rec.model, rec.role
    record("splitserve_autoscaler_target_replicas", rec.target, model=model, pool=pool)
    record("splitserve_autoscaler_desired_replicas", rec.desired, model=model, pool=pool)
    if rec.value is not None:
        record("splitserve_autoscaler_load", rec.value, model=model, pool=pool)
    labels = decision_labels(rec)
    prev = _last_decision.get((model, pool))
    if prev is not None and prev != labels:
        record("splitserve_autoscaler_last_decision", 0, model=model, pool=pool, **prev)
    _last_decision[(model, pool)] = labels
    record("splitserve_autoscaler_last_decision", 1, model=model, pool=pool, **labels)
