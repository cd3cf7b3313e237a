"""The one place where the simulator builds the production code's inputs.

Each function here mirrors a piece of the deployed cluster that turns an
engine's state into what the router and the autoscaler read, and names
it; when those contracts change (typed stats structs in router/types.py,
say), this module is what follows them:

- ``worker_stats``: ``PrefillWorker.stats`` / ``DecodeWorker.stats``
  (``LLMEngine.load_stats`` plus the worker's counters).
- ``router_stats``: the stats ``WorkerServer.push_stats`` sends.
- ``push_to_router``: ``RouterActor.update_stats`` (stats and prefix-cache
  events into ``RouterCore``).
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
from splitserve.router.core import RouterCore
from splitserve.router.types import DecodeReplicaStats, PrefillReplicaStats, RouteRequest, RouterConfig


def worker_stats(rep: SimReplica, now: float) -> dict:
    """What the replica's worker answers to ``Stats`` at ``now``."""
    rep.sync(now)
    kv = rep.kv
    s = {"pending_prompt_tokens": rep.pending_prompt_tokens(),
         "running": len(rep.sched.running), "waiting": len(rep.sched.waiting),
         "free_blocks": kv.num_free_blocks, "total_blocks": kv.num_blocks,
         "busy_time_s": rep.busy_time_at(now), "preemptions": rep.sched.num_preemptions,
         "prefix_hits": kv.pool.hits, "prefix_queries": kv.pool.queries,
         "cached_blocks": len(kv.pool.hash_to_block)}
    if rep.role == "prefill":
        s.update(prompt_tokens_computed=rep.prompt_tokens_computed, bytes_sent=rep.bytes_sent,
                 inflight=rep.inflight)
    else:
        s.update(max_seqs=rep.sched.max_num_seqs, block_size=rep.block_size,
                 reservations=rep.reservations, steps=rep.steps_at(now),
                 handoffs=rep.handoffs, handoff_bytes=rep.handoff_bytes, draining=rep.draining)
    return s


def router_stats(rep: SimReplica, s: dict, now: float) -> PrefillReplicaStats | DecodeReplicaStats:
    """``WorkerServer.push_stats``: the router's view of one replica."""
    busy = max(s["busy_time_s"], 1e-9)
    if rep.role == "prefill":
        return PrefillReplicaStats(
            replica_id=rep.replica_id, model=rep.model,
            pending_prompt_tokens=s["pending_prompt_tokens"],
            running_requests=s["running"] + s["waiting"],
            prefill_tokens_per_s=s["prompt_tokens_computed"] / busy
            if s["prompt_tokens_computed"] else 0.0,
            healthy=rep.alive, draining=rep.draining, node_id=rep.node_id, updated_at=now)
    steps = max(s["steps"], 1)
    return DecodeReplicaStats(
        replica_id=rep.replica_id, model=rep.model, free_blocks=s["free_blocks"],
        total_blocks=s["total_blocks"], running_seqs=s["running"], max_seqs=s["max_seqs"],
        block_size=s["block_size"], waiting_requests=s["waiting"],
        decode_step_s=s["busy_time_s"] / steps, prefill_tokens_per_s=0.0,
        healthy=rep.alive, draining=rep.draining, node_id=rep.node_id, updated_at=now)


def push_to_router(core: RouterCore, rep: SimReplica, now: float, snapshot: bool) -> bool:
    """One stats push of ``rep`` (``RouterActor.update_stats``): its stats
    and the prefix-cache events its block pool drained. Returns whether the
    router asks for a snapshot next time."""
    pool = rep.kv.pool
    if snapshot:
        pool.request_snapshot()
    ev = pool.drain_events()
    stats = router_stats(rep, worker_stats(rep, now), now)
    unknown = core.update_stats(stats)
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
    r = cfg.router
    return RouterConfig(
        policy=r.policy, block_size=min(m.model.block_size for m in cfg.models),
        kv_bytes_per_token=dict(kv_bytes_per_token), max_queue_per_model=r.max_queue_per_model,
        stats_ttl_s=r.stats_ttl_s, network_bandwidth_bytes_per_s=r.network_bytes_per_s,
        local_prefill_max_tokens=r.local_prefill_max_tokens,
        max_queue_delay_s=r.max_queue_delay_s)


def route_request(request_id: str, model: str, prompt_len: int, max_tokens: int,
                  hashes: list[int], exclude: set[str]) -> RouteRequest:
    """``ClusterBackend.generate``'s request to the router (hashes precomputed)."""
    return RouteRequest(request_id=request_id, model=model, prompt_len=prompt_len,
                        max_tokens=max(1, max_tokens), block_hashes=tuple(hashes),
                        exclude_replicas=frozenset(exclude))


def autoscaling_metrics(rep: SimReplica, now: float) -> dict[str, float]:
    """``WorkerServer.record_autoscaling_stats`` (no GPU telemetry in simulation)."""
    return replica_metrics(rep.role, worker_stats(rep, now), rep.draining)


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
