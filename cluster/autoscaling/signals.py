"""The metrics a replica reports to the autoscaler, and how they are made
from its worker's stats.

Gauges are instantaneous; counters are cumulative since the replica started
(``decision`` turns them into rates over its look-back window). Ray Serve
takes only numbers, so flags travel as 0.0 / 1.0.
"""

from __future__ import annotations

from splitserve.cluster.observability.telemetry import GpuTelemetry
from splitserve.engine.stats import PrefillStats, WorkerStats

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


def replica_metrics(stats: WorkerStats, draining: bool = False,
                    gpu: GpuTelemetry | None = None) -> dict[str, float]:
    """Autoscaling metrics of one replica from its worker's ``stats()`` and,
    where available, its GPU telemetry (``splitserve.cluster.observability.telemetry``)."""
    e = stats.engine
    out = {
        KV_USED_FRACTION: 1.0 - e.free_blocks / max(e.total_blocks, 1),
        RUNNING: float(e.running),
        WAITING: float(e.waiting),
        BUSY_TIME_S: float(e.busy_time_s),
        DRAINING: 1.0 if draining else 0.0,
        # colocated replicas prefill too: decode pools report their prompt queue as well
        PENDING_PROMPT_TOKENS: float(e.pending_prompt_tokens),
    }
    if isinstance(stats, PrefillStats):
        out[PROMPT_TOKENS_COMPUTED] = float(e.prompt_tokens_computed)
        out[HANDOFF_BYTES] = float(stats.bytes_sent)
    else:
        out[SEQ_FRACTION] = e.running / max(e.max_seqs, 1)
        out[DECODE_STEPS] = float(e.steps)
        out[HANDOFF_BYTES] = float(stats.handoff_bytes)
    if gpu is not None and gpu.available and gpu.devices:
        devs = gpu.devices
        out[GPU_UTILIZATION] = sum(d.utilization_gpu for d in devs) / len(devs) / 100.0
    return out
