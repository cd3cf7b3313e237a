"""The metrics a replica reports to the autoscaler, and how they are made
from its worker's stats.

Gauges are instantaneous; counters are cumulative since the replica started
(``decision`` turns them into rates over its look-back window). Ray Serve
takes only numbers, so flags travel as 0.0 / 1.0.
"""

from __future__ import annotations

from typing import Any, Mapping

# gauges
PENDING_PROMPT_TOKENS = "pending_prompt_tokens"
KV_USED_FRACTION = "kv_used_fraction"
SEQ_FRACTION = "seq_fraction"
RUNNING = "running"
WAITING = "waiting"
GPU_UTILIZATION = "gpu_utilization"  # 0..1, mean over the replica's GPUs
DRAINING = "draining"
# counters
BUSY_TIME_S = "busy_time_s"
PROMPT_TOKENS_COMPUTED = "prompt_tokens_computed"
DECODE_STEPS = "decode_steps"
HANDOFF_BYTES = "handoff_bytes"


def replica_metrics(role: str, stats: Mapping[str, Any], draining: bool = False,
                    gpu: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Autoscaling metrics of one replica from its worker's ``stats()`` and,
    where available, its GPU telemetry (``splitserve.cluster.observability.telemetry``)."""
    total = max(int(stats.get("total_blocks", 0)), 1)
    out = {
        KV_USED_FRACTION: 1.0 - stats.get("free_blocks", total) / total,
        RUNNING: float(stats.get("running", 0)),
        WAITING: float(stats.get("waiting", 0)),
        BUSY_TIME_S: float(stats.get("busy_time_s", 0.0)),
        DRAINING: 1.0 if draining else 0.0,
    }
    if role == "prefill":
        out[PENDING_PROMPT_TOKENS] = float(stats.get("pending_prompt_tokens", 0))
        out[PROMPT_TOKENS_COMPUTED] = float(stats.get("prompt_tokens_computed", 0))
        out[HANDOFF_BYTES] = float(stats.get("bytes_sent", 0))
    else:
        out[SEQ_FRACTION] = stats.get("running", 0) / max(int(stats.get("max_seqs", 1)), 1)
        out[DECODE_STEPS] = float(stats.get("steps", 0))
        out[HANDOFF_BYTES] = float(stats.get("handoff_bytes", 0))
        if "pending_prompt_tokens" in stats:  # colocated replicas prefill too
            out[PENDING_PROMPT_TOKENS] = float(stats["pending_prompt_tokens"])
    if gpu and gpu.get("available") and gpu.get("devices"):
        devs = gpu["devices"]
        out[GPU_UTILIZATION] = sum(d["utilization_gpu"] for d in devs) / len(devs) / 100.0
    return out
