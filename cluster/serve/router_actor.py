"""The router as a Ray actor: one per cluster, named, restarted on failure.

It wraps ``splitserve.router.core.RouterCore``. Workers push their stats and prefix
cache events to it; ingresses ask it for placements. It is never on the
token path, so a restart only costs the state it held: the workers push
their stats again within one period, and a replica the router does not know
is asked (by ``update_stats``' reply) for a snapshot of its prefix cache on
its next push. In-flight streams are unaffected.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import msgspec
import ray

from splitserve.cluster.observability.metrics import RouterMetrics, render_prometheus
from splitserve.engine.roles import Role
from splitserve.router.config import RouterConfig
from splitserve.router.core import RouterCore
from splitserve.router.reports import ReplicaInfo, StatsReport, replica_stats
from splitserve.router.types import (
    NoCapacityError,
    OverloadedError,
    Placement,
    QueueDelayError,
    RouteRefusal,
    RouteRequest,
    UnknownModelError,
)

ROUTER_NAME = "splitserve-router"
NAMESPACE = "splitserve"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64)
class RouterActor:
    def __init__(self, cfg: RouterConfig):
        self.core = RouterCore(cfg)
        self.replicas_info: dict[str, ReplicaInfo] = {}  # every replica core holds stats of
        self.latest: dict[str, StatsReport] = {}  # each one's last report, for /metrics
        self.started_at = time.time()
        self._last_prune = 0.0
        self.metrics = RouterMetrics()

    def ready(self) -> bool:
        return True

    def reconfigure(self, cfg: RouterConfig) -> None:
        """Replace the routing config; replica stats are pushed again."""
        self.core = RouterCore(cfg)

    def update_stats(self, report: StatsReport) -> bool:
        """A replica's periodic push: its stats and its prefix-cache events
        since the last push (``report.snapshot``: ``stored`` is its whole
        cache). Returns True when the router needs a snapshot next time: it
        did not know the replica (it restarted, was reconfigured, or pruned
        it), so the deltas it got so far describe only part of the cache."""
        s = replica_stats(report)
        try:
            unknown = self.core.update_stats(s)
        except UnknownModelError:
            return False
        self.replicas_info[s.replica_id] = report.replica
        self.latest[s.replica_id] = msgspec.structs.replace(report, stored=(), evicted=())
        if report.snapshot:
            self.core.replace_blocks(s.replica_id, report.stored)
        else:
            if report.stored:
                self.core.on_blocks_stored(s.replica_id, report.stored)
            if report.evicted:
                self.core.on_blocks_evicted(s.replica_id, report.evicted)
        self.metrics.publish(self.core, self.replicas_info)
        return unknown and not report.snapshot

    def cached_blocks(self) -> dict[str, int]:
        """Replica id -> prefix-cache blocks the router's index holds for it."""
        return {rid: self.core.index.num_blocks(rid) for rid in self.replicas_info}

    def remove_replica(self, replica_id: str) -> bool:
        self.replicas_info.pop(replica_id, None)
        self.latest.pop(replica_id, None)
        return self.core.remove_replica(replica_id)

    def set_prefer_local_prefill(self, prefer: bool) -> None:
        self.core.set_prefer_local_prefill(prefer)

    def route(self, req: RouteRequest, admit: bool = True) -> Placement | RouteRefusal:
        """Admit (optionally) and place a request. A refusal is returned, not
        raised: it is an answer the caller acts on (HTTP 429, 503, 404), and
        returned it arrives as itself rather than wrapped in a RayTaskError."""
        now = time.time()
        if now - self._last_prune > 1.0:
            self._last_prune = now
            self.prune(now)
        try:
            if admit:
                self.core.admit(req.model)
            try:
                p = self.core.route(req, shed=admit)
            except BaseException:
                if admit:
                    self.core.release(req.model)
                raise
        except OverloadedError as e:
            self.metrics.on_rejection(req.model, "overloaded")
            return e
        except QueueDelayError as e:  # past saturation: shed like a full queue
            self.metrics.on_rejection(req.model, "queue_delay")
            return e
        except NoCapacityError as e:
            self.metrics.on_rejection(req.model, "no_capacity")
            return e
        except UnknownModelError as e:
            return e
        self.metrics.on_placement(req.model, p.reason)
        return p

    def release(self, model: str) -> None:
        try:
            self.core.release(model)
        except Exception:  # noqa: BLE001 - a restart lost the slot: nothing to give back
            pass

    def prune(self, now: float | None = None) -> list[str]:
        """Forget replicas silent for 3 stats TTLs (dead without deregistering:
        killed, or their node lost). Returns the ids removed."""
        now = time.time() if now is None else now
        limit = 3 * self.core.cfg.stats_ttl_s
        gone = []
        for model in self.core.cfg.models:
            snap = self.core.snapshot(model)
            gone += [s.replica_id for s in (*snap.prefill, *snap.decode)
                     if now - s.updated_at > limit]
        for rid in gone:
            self.remove_replica(rid)
        return gone

    def replicas(self) -> dict[str, Any]:
        """The operators' view (``splitserve status``): model -> router pool
        ("prefill", "decode") -> each replica's stats as a dict."""
        self.prune()
        out: dict[str, Any] = {}
        for model in self.core.cfg.models:
            snap = self.core.snapshot(model)
            out[model] = {Role.PREFILL.value: [asdict(s) for s in snap.prefill],
                          Role.DECODE.value: [asdict(s) for s in snap.decode]}
        return out

    def counters(self) -> dict[str, Any]:
        return asdict(self.core.counters())

    def live_replicas(self) -> dict[str, dict[str, int]]:
        """Readiness: model -> role (prefill, decode, colocated) -> replicas
        that are healthy, not draining, and reported within stats_ttl_s."""
        horizon = time.time() - self.core.cfg.stats_ttl_s
        out: dict[str, dict[str, int]] = {}
        for model in self.core.cfg.models:
            counts = out.setdefault(model, {})
            snap = self.core.snapshot(model)
            for s in (*snap.prefill, *snap.decode):
                info = self.replicas_info.get(s.replica_id)
                if info is not None and s.healthy and not s.draining and s.updated_at >= horizon:
                    counts[info.role.value] = counts.get(info.role.value, 0) + 1
        return out

    def metrics_scrape(self) -> tuple[list[StatsReport], str]:
        """/metrics: the last report of every replica the router holds
        (without its cache events) and the router's metrics as text."""
        self.prune()
        self.metrics.publish(self.core, self.replicas_info, force=True)
        snaps = [self.core.snapshot(m) for m in self.core.cfg.models]
        held = {s.replica_id for snap in snaps for s in (*snap.prefill, *snap.decode)}
        return [r for rid, r in self.latest.items() if rid in held], render_prometheus().decode()


def get_router(create_with: RouterConfig | None = None):
    """The cluster's router actor; created (detached) if ``create_with`` is given."""
    try:
        return ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
    except ValueError:
        if create_with is None:
            raise
    return RouterActor.options(name=ROUTER_NAME, namespace=NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote(create_with)
