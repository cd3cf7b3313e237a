"""What a replica pushes to the router, and the router's view of it.

Every ``stats_period_s`` a worker replica sends the router actor one
``StatsReport``: who it is (``ReplicaInfo``), its worker's typed stats
(``splitserve.engine.stats``), its health and drain flags, and its
prefix-cache events since the last push. ``replica_stats`` turns a report
into the ``PrefillReplicaStats`` / ``DecodeReplicaStats`` the policies
read: the one place where raw counters become rates (prefill speed, decode
step time).
"""

from __future__ import annotations

import msgspec

from splitserve.engine.roles import Role
from splitserve.engine.stats import DecodeStats, PrefillStats, WorkerStats
from splitserve.router.types import DecodeReplicaStats, InvalidStatsError, PrefillReplicaStats


class ReplicaInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Who a replica is: stable for its lifetime."""

    replica_id: str  # its worker RPC address, host:port
    role: Role
    model: str
    kv_endpoint: str  # where prefill replicas send it KV; "" for a prefill replica
    node_id: str  # its Ray node; "" = unknown


class StatsReport(msgspec.Struct, frozen=True, kw_only=True):
    """One periodic push of a replica to the router."""

    replica: ReplicaInfo
    stats: WorkerStats
    healthy: bool  # its engine thread is alive
    draining: bool  # it takes no new work
    updated_at: float  # wall-clock seconds when ``stats`` was read
    stored: tuple[int, ...]  # block hashes its prefix cache stored since the last push
    evicted: tuple[int, ...]  # ... and evicted
    snapshot: bool  # ``stored`` is its whole cache, not a delta


def replica_stats(report: StatsReport) -> PrefillReplicaStats | DecodeReplicaStats:
    """The router's view of a replica from its report. Raises
    InvalidStatsError when the stats are not of the replica's role's pool."""
    info, s = report.replica, report.stats
    expected = PrefillStats if info.role.pool is Role.PREFILL else DecodeStats
    if not isinstance(s, expected):
        raise InvalidStatsError(
            f"replica {info.replica_id!r} (model {info.model!r}) is a {info.role} replica but "
            f"pushed {type(s).__name__}; a {info.role} replica reports {expected.__name__}")
    e = s.engine
    if isinstance(s, PrefillStats):
        busy = max(e.busy_time_s, 1e-9)
        return PrefillReplicaStats(
            replica_id=info.replica_id, model=info.model,
            pending_prompt_tokens=e.pending_prompt_tokens, running_requests=e.queued,
            prefill_tokens_per_s=e.prompt_tokens_computed / busy if e.prompt_tokens_computed
            else 0.0,
            healthy=report.healthy, draining=report.draining, node_id=info.node_id,
            updated_at=report.updated_at, adapters=frozenset(e.adapters),
            host_adapters=frozenset(e.host_adapters))
    return DecodeReplicaStats(
        replica_id=info.replica_id, model=info.model, free_blocks=e.free_blocks,
        total_blocks=e.total_blocks, running_seqs=e.running, max_seqs=e.max_seqs,
        # open hand-off reservations join the batch when their KV arrives:
        # counted as waiting, so placement stops at max_seqs while prompts
        # are still being prefilled elsewhere
        block_size=e.block_size, waiting_requests=e.waiting + s.reservations,
        decode_step_s=e.busy_time_s / max(e.steps, 1),
        # local prefill is not measured on decode replicas yet: the cost
        # model assumes RouterConfig.assumed_prefill_tokens_per_s and an
        # empty local queue
        prefill_tokens_per_s=0.0, pending_prefill_tokens=0,
        healthy=report.healthy, draining=report.draining, node_id=info.node_id,
        updated_at=report.updated_at, adapters=frozenset(e.adapters),
        host_adapters=frozenset(e.host_adapters))


_REPORT = msgspec.msgpack.Decoder(StatsReport)
_ENCODER = msgspec.msgpack.Encoder()


def encode_report(report: StatsReport) -> bytes:
    """A push as it travels over a router stream (msgpack)."""
    return _ENCODER.encode(report)


def decode_report(data: bytes) -> StatsReport:
    """Raises msgspec.ValidationError / DecodeError on anything that is not
    exactly one ``StatsReport``."""
    return _REPORT.decode(data)
