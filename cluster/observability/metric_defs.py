"""Every metric splitserve exports, declared once: name, kind, labels,
buckets and the series names a dashboard queries (``splitserve.cluster.observability.metrics``
records them)."""

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

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricDef:
    name: str  # as recorded: no ``ray_`` prefix, no ``_total`` suffix
    kind: Kind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def exported_names(self, prefix: str = RAY_PREFIX) -> tuple[str, ...]:
        """The series names Prometheus scrapes for this metric."""
        base = prefix + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


_M, _MR, _MP, _WR = ("model",), ("model", "reason"), ("model", "pool"), ("model", "role")
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
    MetricDef("splitserve_output_tokens", "counter", "Tokens streamed to clients.", _M),
    MetricDef("splitserve_retries", "counter",
              "Requests placed again (kind: replaced = refused or lost before its first "
              "token; resumed = its decode replica died mid-stream).", ("model", "kind")),
    MetricDef("splitserve_fallbacks", "counter",
              "Requests prefilled on their decode replica because the remote prefill failed.", _M),
    MetricDef("splitserve_refusals", "counter",
              "Requests refused to the client (reason: overloaded = queues full, "
              "unavailable = no replica could take it).", _MR),
    # -- per replica, pushed with the router stats ---------------------------
    MetricDef("splitserve_pending_prompt_tokens", "gauge",
              "Prompt tokens queued or in progress, not yet computed.", _WR),
    MetricDef("splitserve_kv_block_usage", "gauge", "Share of KV cache blocks in use (0..1).", _WR),
    MetricDef("splitserve_kv_blocks_total", "gauge", "KV cache blocks of the replica.", _WR),
    MetricDef("splitserve_running_seqs", "gauge", "Sequences in the running batch.", _WR),
    MetricDef("splitserve_waiting_requests", "gauge", "Requests waiting for the batch.", _WR),
    MetricDef("splitserve_preemptions", "counter",
              "Sequences preempted (blocks freed, recomputed later).", _WR),
    MetricDef("splitserve_prefix_cache_hit_rate", "gauge",
              "Share of prompt admissions that reused cached prefix blocks, since start.", _WR),
    MetricDef("splitserve_replica_refusals", "counter",
              "KV reservations a decode replica refused (full); the request moved on.", _WR),
    MetricDef("splitserve_replica_fallbacks", "counter",
              "Remote prefills that failed on this decode replica and ran locally.", _WR),
    # -- router --------------------------------------------------------------
    MetricDef("splitserve_router_decisions", "counter",
              "Placements by the policy's reason.", _MR),
    MetricDef("splitserve_router_rejections", "counter",
              "Requests the router refused (reason: overloaded = slots full, queue_delay = "
              "predicted prefill wait past max_queue_delay_s, queue_timeout = waited past its "
              "deadline, no_replica = no live decode replica past the grace period, "
              "no_capacity = too large for any decode replica).", _MR),
    MetricDef("splitserve_router_in_flight", "gauge",
              "Admission slots held: requests placed or waiting, not yet released.", _M),
    MetricDef("splitserve_router_queued", "gauge",
              "Requests waiting in the router's queue for a replica that can take them.", _M),
    MetricDef("splitserve_router_queue_wait_seconds", "gauge",
              "How long the oldest request in the router's queue has waited.", _M),
    MetricDef("splitserve_router_lease_events", "counter",
              "Admission slots that ended without their release (event: expired = the "
              "ingress went silent, reclaimed = the ingress no longer listed it, "
              "unbalanced_release = a release of no held slot) or were learned from an "
              "ingress's list (adopted: after a router restart or failover).", ("event",)),
    MetricDef("splitserve_pool_replicas", "gauge",
              "Replicas reporting to the router (pool: prefill, decode, colocated).", _MP),
    # -- autoscaler ----------------------------------------------------------
    MetricDef("splitserve_autoscaler_target_replicas", "gauge",
              "Replica count the autoscaler last set.", _MP),
    MetricDef("splitserve_autoscaler_desired_replicas", "gauge",
              "Replica count the load asks for, before delays and cooldown.", _MP),
    MetricDef("splitserve_autoscaler_load", "gauge",
              "The pool's bottleneck load relative to its target (1 = on target).", _MP),
    MetricDef("splitserve_autoscaler_last_decision", "gauge",
              "1 on the series of the pool's last decision: decision up/down/hold, reason "
              "no_metrics/bounds/scaled/delayed/on_target (see decision_labels).",
              ("model", "pool", "bottleneck", "decision", "reason")),
)}
