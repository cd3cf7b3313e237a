"""Every metric splitserve exports, declared once: name, kind, labels,
buckets, where its numbers live, and the series names a dashboard queries
(``splitserve.cluster.observability.metrics`` records them,
``splitserve.cluster.observability.exposition`` serves them on /metrics).

Where a metric's numbers live (``source``) decides how /metrics of the HTTP
port gets it:
  request    recorded by the ingress process itself, per request
  replica    read from each replica's latest stats report, which the
             router holds (one router call per scrape)
  router     the router actor's own metrics, fetched in the same call
  autoscaler only on Ray's per-node exporter (recorded in Serve's
             controller), as ``ray_splitserve_*``
Every metric is also recorded through Ray's exporter where Ray runs, with
Ray's ``ray_`` prefix (histogram sums there are bucket-midpoint estimates;
on /metrics they are exact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RAY_PREFIX = "ray_"

# Buckets. Each set includes the reference SLOs of docs (benchmarks.md) as
# edges, so SLO attainment can be read exactly from one bucket
# (``le="0.25"``) rather than interpolated.
# TTFT: 5 ms (a cached prefix on a GPU) .. 60 s (long prompts queued);
# 0.125 / 0.25 / 15 s are the code, chat and summarization TTFT SLOs.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.125, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
                30.0, 60.0)
# TPOT and ITL: 1 ms (small batch on a GPU) .. 2.5 s (a CPU replica under
# load); 0.1 / 0.15 / 0.2 s are the TPOT SLOs.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1.0, 2.5)
# E2E and per-phase durations: 1 ms (routing) .. 10 min (long generations).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Hand-off bytes per request, powers of 4 from 4 KiB (a few tokens of a tiny
# model) to 16 GiB (Llama-3-70B's 320 KiB/token x 32k tokens is 10 GiB).
BYTES_BUCKETS = tuple(float(4 ** k) for k in range(6, 18))
# Tokens per request (prompt or output): 1 .. 200k, vLLM's 1-2-5 steps.
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))[:-1]

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["request", "replica", "router", "autoscaler"]
# labels /metrics adds to a replica metric's tags: which replica (its worker
# RPC address; ``local:<model>`` in a single-process server)
REPLICA_LABEL = "replica"


@dataclass(frozen=True)
class MetricDef:
    name: str  # as recorded: no ``ray_`` prefix, no ``_total`` suffix
    kind: Kind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    source: Source = "request"

    @property
    def on_api_port(self) -> bool:
        """Served on /metrics of the HTTP port (else only through Ray's exporter)."""
        return self.source != "autoscaler"

    def api_labels(self) -> tuple[str, ...]:
        """Its labels on /metrics of the HTTP port."""
        return self.tags + ((REPLICA_LABEL,) if self.source == "replica" else ())

    def dashboard_names(self) -> tuple[str, ...]:
        """The series a dashboard queries: /metrics of the HTTP port where
        it is served there, else Ray's exporter."""
        return self.exported_names("" if self.on_api_port else RAY_PREFIX)

    def exported_names(self, prefix: str = RAY_PREFIX) -> tuple[str, ...]:
        """The series names Prometheus scrapes for this metric (``prefix``:
        ``ray_`` on Ray's exporter, "" on /metrics of the HTTP port)."""
        base = prefix + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


_M, _MR, _MP, _WR = ("model",), ("model", "reason"), ("model", "pool"), ("model", "role")


def _replica(name: str, kind: Kind, description: str) -> MetricDef:
    return MetricDef(name, kind, description, _WR, source="replica")


def _router(name: str, kind: Kind, description: str, tags: tuple[str, ...]) -> MetricDef:
    return MetricDef(name, kind, description, tags, source="router")


def _autoscaler(name: str, description: str, tags: tuple[str, ...] = _MP) -> MetricDef:
    return MetricDef(name, "gauge", description, tags, source="autoscaler")


METRICS: dict[str, MetricDef] = {d.name: d for d in (
    # -- per request, recorded by the ingress's backend ----------------------
    MetricDef("splitserve_ttft_seconds", "histogram",
              "Time to first token: request start to its first token.", _M, TTFT_BUCKETS),
    MetricDef("splitserve_tpot_seconds", "histogram",
              "Time per output token after the first: (last - first token) / (tokens - 1).",
              _M, TOKEN_BUCKETS),
    MetricDef("splitserve_itl_seconds", "histogram",
              "Inter-token latency: gap between consecutive streamed outputs.", _M, TOKEN_BUCKETS),
    MetricDef("splitserve_e2e_seconds", "histogram",
              "End-to-end latency: request start to its last token.", _M, DURATION_BUCKETS),
    MetricDef("splitserve_request_phase_seconds", "histogram",
              "Per-request phase durations (phase: queue, prefill, handoff, decode); they add "
              "up to the E2E latency. See phase_breakdown.", ("model", "phase"), DURATION_BUCKETS),
    MetricDef("splitserve_handoff_request_bytes", "histogram",
              "KV bytes moved from prefill to decode per remotely prefilled request.", _M,
              BYTES_BUCKETS),
    MetricDef("splitserve_handoff_bytes", "counter",
              "KV bytes moved from prefill to decode (rate: hand-off bytes/s).", _M),
    MetricDef("splitserve_requests", "counter",
              "Requests ended, by outcome: finished, refused, failed, cancelled.",
              ("model", "outcome")),
    MetricDef("splitserve_finished_requests", "counter",
              "Requests that finished, by the engine's finish reason (stop, length).",
              ("model", "finish_reason")),
    MetricDef("splitserve_prompt_tokens", "counter",
              "Prompt tokens of requests that produced output (prefill done).", _M),
    MetricDef("splitserve_cached_prompt_tokens", "counter",
              "Of splitserve_prompt_tokens, those whose KV came from a prefix cache.", _M),
    MetricDef("splitserve_output_tokens", "counter", "Tokens streamed to clients.", _M),
    MetricDef("splitserve_request_prompt_tokens", "histogram",
              "Prompt tokens per finished request.", _M, TOKEN_COUNT_BUCKETS),
    MetricDef("splitserve_request_output_tokens", "histogram",
              "Output tokens per finished request.", _M, TOKEN_COUNT_BUCKETS),
    MetricDef("splitserve_retries", "counter",
              "Requests placed again (kind: replaced = refused or lost before its first "
              "token; resumed = its decode replica died mid-stream).", ("model", "kind")),
    MetricDef("splitserve_fallbacks", "counter",
              "Requests prefilled on their decode replica because the remote prefill failed.", _M),
    MetricDef("splitserve_refusals", "counter",
              "Requests refused to the client (reason: overloaded = queues full, "
              "unavailable = no replica could take it, invalid = found invalid once placed, "
              "e.g. larger than any decode replica's KV cache).", _MR),
    # -- per route variant, recorded by the ingress (cluster/api/routing.py) --
    MetricDef("splitserve_route_requests", "counter",
              "Requests a route sent to a variant that ended, by outcome: ok, or error (a "
              "server-side failure); what ramp guards judge.", ("route", "variant", "outcome")),
    MetricDef("splitserve_route_ttft_seconds", "histogram",
              "Time to first token of a route's requests, by the variant that served them.",
              ("route", "variant"), TTFT_BUCKETS),
    MetricDef("splitserve_route_tpot_seconds", "histogram",
              "Time per output token of a route's requests, by variant.", ("route", "variant"),
              TOKEN_BUCKETS),
    MetricDef("splitserve_route_weight", "gauge",
              "Share of a route's traffic each variant gets now (0..1), as the ingress holds "
              "it (a ramp moves it).", ("route", "variant")),
    # -- per replica, from its stats reports ----------------------------------
    _replica("splitserve_pending_prompt_tokens", "gauge",
             "Prompt tokens queued or in progress, not yet computed."),
    _replica("splitserve_kv_cache_usage_ratio", "gauge", "Share of KV cache blocks in use (0..1)."),
    _replica("splitserve_kv_cache_blocks", "gauge", "KV cache blocks of the replica."),
    _replica("splitserve_running_seqs", "gauge", "Sequences in the running batch."),
    _replica("splitserve_waiting_requests", "gauge", "Requests waiting for the batch."),
    _replica("splitserve_preemptions", "counter",
             "Sequences preempted (blocks freed, recomputed later)."),
    _replica("splitserve_prefix_cache_queries", "counter",
             "Admissions of a sequence that looked its prompt up in the prefix cache."),
    _replica("splitserve_prefix_cache_hits", "counter",
             "Of those admissions, the ones that reused cached prefix blocks."),
    _replica("splitserve_replica_refusals", "counter",
             "KV reservations a decode replica refused (full); the request moved on."),
    _replica("splitserve_replica_fallbacks", "counter",
             "Remote prefills that failed on this decode replica and ran locally."),
    _replica("splitserve_lora_slots", "gauge",
             "LoRA adapter slots on the replica's device (max_loras; absent: none)."),
    _replica("splitserve_lora_slots_in_use", "gauge",
             "LoRA adapter slots a running sequence holds (the others may be evicted)."),
    _replica("splitserve_spec_decode_drafts", "counter",
             "Speculative decoding: sequence steps that verified at least one draft token."),
    _replica("splitserve_spec_decode_draft_tokens", "counter",
             "Speculative decoding: draft tokens verified."),
    _replica("splitserve_spec_decode_accepted_tokens", "counter",
             "Speculative decoding: draft tokens accepted (acceptance rate: its rate over "
             "draft_tokens'; mean accepted length: 1 + its rate over drafts')."),
    _replica("splitserve_spec_decode_draft_seconds", "counter",
             "Speculative decoding: seconds spent proposing draft tokens."),
    # -- router --------------------------------------------------------------
    _router("splitserve_router_decisions", "counter",
            "Placements by the policy's reason.", _MR),
    _router("splitserve_router_rejections", "counter",
            "Requests the router refused (reason: overloaded = slots full, queue_delay = "
            "predicted prefill wait past max_queue_delay_s, queue_timeout = waited past its "
            "deadline, no_replica = no live decode replica past the grace period, "
            "no_capacity = too large for any decode replica).", _MR),
    _router("splitserve_router_in_flight", "gauge",
            "Admission slots held: requests placed or waiting, not yet released.", _M),
    _router("splitserve_router_queued", "gauge",
            "Requests waiting in the router's queue for a replica that can take them.", _M),
    _router("splitserve_router_queue_wait_seconds", "gauge",
            "How long the oldest request in the router's queue has waited.", _M),
    _router("splitserve_router_lease_events", "counter",
            "Admission slots that ended without their release (event: expired = the "
            "ingress went silent, reclaimed = the ingress no longer listed it, "
            "unbalanced_release = a release of no held slot) or were learned from an "
            "ingress's list (adopted: after a router restart or failover).", ("event",)),
    _router("splitserve_pool_replicas", "gauge",
              "Replicas reporting to the router (pool: prefill, decode, colocated).", _MP),
    # -- autoscaler ----------------------------------------------------------
    _autoscaler("splitserve_autoscaler_target_replicas", "Replica count the autoscaler last set."),
    _autoscaler("splitserve_autoscaler_desired_replicas",
                "Replica count the load asks for, before delays and cooldown."),
    _autoscaler("splitserve_autoscaler_load",
                "The pool's bottleneck load relative to its target (1 = on target)."),
    _autoscaler("splitserve_autoscaler_last_decision",
                "1 on the series of the pool's last decision: decision up/down/hold, reason "
                "no_metrics/bounds/scaled/delayed/on_target (see decision_labels).",
                ("model", "pool", "bottleneck", "decision", "reason")),
)}
