"""The one place where the simulator builds the production code's inputs.

Each function here mirrors a piece of the deployed cluster that turns an
engine's state into what the router and the autoscaler read, and names
it; when those contracts change, this module is what follows them:

- ``worker_stats``: ``PrefillWorker.stats`` / ``DecodeWorker.stats``, the
  typed ``PrefillStats`` / ``DecodeStats`` of ``splitserve.engine.stats``.
- ``stats_report``: the ``StatsReport`` ``WorkerServer.push_stats`` sends;
  the router's view of it comes from the production ``replica_stats``.
- ``push_to_router``: ``RouterActor.update_stats`` (stats into
  ``RouterService``, which serves its wait queue, and prefix-cache events
  into its ``RouterCore``).
- ``route_call`` / ``lease_end``: the ``RouteCall`` / ``LeaseEnd`` the
  router client (``cluster.serve.router_client``) sends in its exchanges.
- ``router_config``: ``cluster.serve.app.router_config`` without loading
  the checkpoint (KV bytes per token come from the model's shape).
- ``route_request``: the ``RouteRequest`` ``ClusterBackend.generate`` sends.
- ``autoscaling_metrics`` / ``PoolSeriesBuffer`` / ``decide``: the metrics
  ``WorkerServer.record_autoscaling_stats`` reports, kept as Serve keeps
  them (``serve_policy.series_from_context``), and the call
  ``serve_policy.bottleneck_policy`` makes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Mapping

from splitserve.cluster.autoscaling import decision
from splitserve.cluster.autoscaling.decision import Decision, DelayState
from splitserve.cluster.autoscaling.signals import replica_metrics
from splitserve.cluster.config import AutoscalingSpec, ClusterConfig
from splitserve.cluster.planning.sim.replica import SimReplica
from splitserve.engine.roles import Role
from splitserve.engine.stats import DecodeStats, EngineLoad, PrefillStats, WorkerStats
from splitserve.router.config import ModelFacts, RouterConfig
from splitserve.router.exchange import LeaseEnd, RouteCall
from splitserve.router.service import RouterService
from splitserve.router.reports import ReplicaInfo, StatsReport, replica_stats
from splitserve.router.types import DecodeReplicaStats, PrefillReplicaStats, RouteRequest


def worker_stats(rep: SimReplica, now: float) -> WorkerStats:
    """What the replica's worker answers to ``Stats`` at ``now``."""
    rep.sync(now)
    kv = rep.kv
    load = EngineLoad(
        pending_prompt_tokens=rep.pending_prompt_tokens(), running=len(rep.sched.running),
        waiting=len(rep.sched.waiting) + len(rep.sched.parked), max_seqs=rep.sched.max_num_seqs,
        free_blocks=kv.num_free_blocks, total_blocks=kv.num_blocks, block_size=rep.block_size,
        busy_time_s=rep.busy_time_at(now), steps=rep.steps_at(now),
        prompt_tokens_computed=rep.prompt_tokens_computed,
        preemptions=rep.sched.num_preemptions, prefix_hits=kv.pool.hits,
        prefix_queries=kv.pool.queries, cached_blocks=len(kv.pool.hash_to_block),
        open_requests=0, block_owners=0)
    if Role(rep.role) is Role.PREFILL:
        return PrefillStats(engine=load, streams=0, inflight=rep.inflight, completed=0, failed=0,
                            bytes_sent=rep.bytes_sent)
    return DecodeStats(engine=load, streams=0, reservations=rep.reservations,
                       handoffs=rep.handoffs, local_prefills=0, fallbacks=0, refused=0,
                       expired=0, handoff_bytes=rep.handoff_bytes, kv_endpoint="")


def stats_report(rep: SimReplica, stats: WorkerStats, now: float, stored=(), evicted=(),
                 snapshot: bool = False) -> StatsReport:
    """``WorkerServer.push_stats``: one replica's report to the router."""
    info = ReplicaInfo(replica_id=rep.replica_id, role=Role(rep.role), model=rep.model,
                       kv_endpoint="", node_id=rep.node_id)
    return StatsReport(replica=info, stats=stats, healthy=rep.alive, draining=rep.draining,
                       updated_at=now, stored=tuple(stored), evicted=tuple(evicted),
                       snapshot=snapshot)


def router_stats(rep: SimReplica, now: float) -> PrefillReplicaStats | DecodeReplicaStats:
    """The router's view of one replica, through the production conversion."""
    return replica_stats(stats_report(rep, worker_stats(rep, now), now))


def push_to_router(service: RouterService, rep: SimReplica, now: float, snapshot: bool) -> bool:
    """One stats push of ``rep`` (``RouterActor.update_stats``): its stats
    (the model's wait queue gets its turn) and the prefix-cache events its
    block pool drained. Returns whether the router asks for a snapshot next
    time."""
    pool = rep.kv.pool
    if snapshot:
        pool.request_snapshot()
    ev = pool.drain_events()
    core = service.core
    unknown = service.update_stats(router_stats(rep, now))
    if ev.snapshot:
        core.replace_blocks(rep.replica_id, ev.stored or [])
    else:
        if ev.stored:
            core.on_blocks_stored(rep.replica_id, ev.stored)
        if ev.evicted:
            core.on_blocks_evicted(rep.replica_id, ev.evicted)
    return unknown and not ev.snapshot


def router_config(cfg: ClusterConfig, kv_bytes_per_token: Mapping[str, int]) -> RouterConfig:
    """``cluster.serve.app.router_config`` with the KV size of each model given."""
    return cfg.router.router_config({
        m.model.name: ModelFacts(block_size=m.model.block_size,
                                 kv_bytes_per_token=kv_bytes_per_token[m.model.name])
        for m in cfg.models})


def route_request(request_id: str, model: str, prompt_len: int, max_tokens: int,
                  hashes: list[int], exclude: set[str]) -> RouteRequest:
    """``ClusterBackend.generate``'s request to the router (hashes precomputed)."""
    return RouteRequest(request_id=request_id, model=model, prompt_len=prompt_len,
                        max_tokens=max(1, max_tokens), block_hashes=tuple(hashes),
                        exclude_replicas=frozenset(exclude))


def route_call(lease_id: str, rr: RouteRequest, arrival: float, now: float,
               admitted: bool) -> RouteCall:
    """The router client's call for one attempt of a request (``admitted``:
    it already holds its slot, a retry or a resume)."""
    return RouteCall(lease_id=lease_id, request=rr, arrival=arrival, waiting_since=now,
                     admitted=admitted)


def lease_end(lease_id: str, output_tokens: int | None) -> LeaseEnd:
    """The release the router client sends when a request ends (None: failed)."""
    return LeaseEnd(lease_id, -1 if output_tokens is None else output_tokens)


def autoscaling_metrics(rep: SimReplica, now: float) -> dict[str, float]:
    """``WorkerServer.record_autoscaling_stats`` (no GPU telemetry in simulation)."""
    return replica_metrics(worker_stats(rep, now), rep.draining)


class PoolSeriesBuffer:
    """The metric series Serve holds for a pool: metric -> replica -> points,
    trimmed to the look-back window."""

    def __init__(self, look_back_s: float):
        self.look_back_s = look_back_s
        self._points: dict[str, dict[str, deque]] = defaultdict(dict)

    def record(self, replica_id: str, now: float, metrics: dict[str, float]) -> None:
        horizon = now - self.look_back_s
        for name, value in metrics.items():
            pts = self._points[name].setdefault(replica_id, deque())
            pts.append((now, float(value)))
            while pts and pts[0][0] < horizon:
                pts.popleft()

    def forget(self, replica_id: str) -> None:
        for per in self._points.values():
            per.pop(replica_id, None)

    def series(self) -> decision.PoolSeries:
        return {name: {rid: list(pts) for rid, pts in per.items()}
                for name, per in self._points.items()}


def decide(buf: PoolSeriesBuffer, spec: AutoscalingSpec, current: int, lo: int, hi: int,
           now: float, state: DelayState | None, running: int) -> Decision:
    """``bottleneck_policy``'s call of ``decision.decide``."""
    return decision.decide(buf.series(), spec, current, lo, hi, now, state, running=running)
