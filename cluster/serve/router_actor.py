"""The routers as Ray actors: ``RouterSpec.routers`` of them, named, each
restarted on failure, each a full replica of the router's knowledge.

Each actor wraps one ``splitserve.router.service.RouterService``. It is an
async actor: every method runs on its one event-loop thread, so the
router's state is changed by one call at a time, and waiting (``poll``)
costs no thread. Every worker replica pushes its stats and prefix-cache
events to every router (``RouterFanout``), so each router knows every
replica and every cached prefix. Each model is placed by one router at a
time (its first live router in a fixed per-model order,
``splitserve.cluster.serve.router_names.router_order``; N models spread
over N routers): the model's
queue and its optimistic view of free KV room must live in one place to
be served in order and not be promised twice. The others are hot
standbys: an ingress that loses a model's router moves its requests to
the next one, which already holds the replicas' stats and prefixes, and
learns the ingress's admission slots from the ``live`` list it sends with
every heartbeat. A restarted router relearns the same within one stats
period (a replica it does not know is asked for a snapshot of its cache on
its next push). Routers are never on the token path: in-flight streams do
not notice.

Traced (``observability.tracing``), the calls it places get spans
(``splitserve.cluster.serve.router_spans``). Names and the per-model
order live in ``router_names``; what a worker replica sends every router
in ``router_fanout``. Its stream (``router_stream``) serves TLS when the
cluster configures ``transfer.tls`` (``set_stream_tls``; the files are read
on the router's node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

import msgspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from splitserve.cluster.config.transfer import TLSSpec
from splitserve.cluster.observability.metrics import RouterMetrics, render_prometheus
from splitserve.cluster.serve import router_state
from splitserve.cluster.serve.node import bind_host
from splitserve.cluster.serve.router_names import MAX_ROUTERS, NAMESPACE, router_name, router_order
from splitserve.cluster.serve.router_spans import RouterSpans
from splitserve.cluster.serve.router_stream import (EXCHANGE, STATS, RouterStreamServer,
                                                     StreamEndpoint)
from splitserve.cluster.serve.ticker import Ticker
from splitserve.engine.roles import Role
from splitserve.router.config import RouterConfig
from splitserve.router.exchange import Exchange, ExchangeReply, Outcome
from splitserve.router.exchange_codec import decode_exchange, encode_reply, encode_resolved
from splitserve.router.reports import ReplicaInfo, StatsReport, decode_report, replica_stats
from splitserve.router.service import RouterService
from splitserve.router.types import UnknownModelError

log = logging.getLogger("splitserve.router")

TICK_S = 0.1  # deadlines, expired leases and the grace period are checked this often


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000)
class RouterActor:
    def __init__(self, cfg: RouterConfig, tick_s: float = TICK_S, index: int = 0,
                 count: int = 1, tracing: dict | None = None, tls: dict | None = None):
        """Router ``index`` of ``count``: it exports the per-model gauges
        (slots, queue, replicas) of the models it places first, so that
        summing over routers counts each once. ``tracing``: the
        ``observability.tracing`` section as a dict, or None; ``tls``: the
        ``transfer.tls`` section as a dict (its stream serves TLS), or None."""
        from splitserve.cluster.observability.tracing import start_tracer

        self.index, self.count = index, count
        self.tracer = start_tracer(tracing, "router")
        self.spans = None if self.tracer is None else RouterSpans(self.tracer, index)
        self.replicas_info: dict[str, ReplicaInfo] = {}  # every replica core holds stats of
        self.latest: dict[str, StatsReport] = {}  # each one's last report, for /metrics
        self.started_at = time.time()
        self.metrics = RouterMetrics()
        self._ticker = Ticker(tick_s, self._tick, log, "router")
        self._wakeups: dict[str, asyncio.Event] = {}  # holder -> its waiting poll
        self._last_prune = 0.0
        self._persist = False  # a cluster's named router keeps its state (router_state)
        self._stream: RouterStreamServer | None = None  # exchanges and pushes over TCP
        self._tls = tls
        cfg, self._prefer_local = self._restore(cfg)
        self._install(RouterService(cfg))

    def _restore(self, cfg: RouterConfig) -> tuple[RouterConfig, bool]:
        """The config and prefer-local switch to start with. A named router
        that Ray restarted takes them from ``router_state`` (its constructor
        argument is the config it was first created with, older than a
        ``reconfigure``); on its first start it stores its config there and
        takes the cluster's switch. An unnamed one (tests) keeps ``cfg``."""
        if not ray.is_initialized():
            return cfg, False
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is None or not ctx.get_actor_name():
            return cfg, False
        self._persist = True
        if ctx.was_current_actor_reconstructed:
            state = router_state.load()
            if state.stream_tls_stored:  # a deploy since its creation set it
                self._tls = state.stream_tls
            if state.config is not None:
                log.info("router %d restarted: config and prefer-local switch (%s) restored",
                         self.index, state.prefer_local_prefill)
            return state.config or cfg, state.prefer_local_prefill
        router_state.save_config(cfg)
        return cfg, router_state.load().prefer_local_prefill

    def _install(self, service: RouterService) -> None:
        models = list(service.cfg.models)
        self.metrics.models = {m for m in models
                               if router_order(m, self.count, models)[0] == self.index}
        self.service = service
        service.core.set_prefer_local_prefill(self._prefer_local)
        service.on_placement = self.metrics.count_placement
        service.on_refusal = self.metrics.count_rejection

    @property
    def core(self):
        return self.service.core

    async def ready(self) -> bool:
        self._ticker.ensure()
        return True

    def reconfigure(self, cfg: RouterConfig, tracing: dict | None = None) -> None:
        """Replace the routing config and the tracing section: like a restart,
        the replicas push their stats again and the ingresses send their
        slots with their next heartbeat. The config is kept where a restarted
        router finds it (``router_state``), and so is the prefer-local
        switch. (A router restarted after a crash traces as it was created:
        ``ensure_routers`` passes the section again on the next deploy.)"""
        from splitserve.cluster.observability.tracing import start_tracer

        if self._persist:
            router_state.save_config(cfg)
        old, self.tracer = self.tracer, start_tracer(tracing, "router")
        self.spans = None if self.tracer is None else RouterSpans(self.tracer, self.index)
        if old is not None:
            old.shutdown()
        self._install(RouterService(cfg))

    # -- replicas -------------------------------------------------------------------
    def update_stats(self, report: StatsReport) -> bool:
        """A replica's periodic push: its stats and its prefix-cache events
        since the last push (``report.snapshot``: ``stored`` is its whole
        cache). Returns True when the router needs a snapshot next time: it
        did not know the replica (it restarted, was reconfigured, or pruned
        it), so the deltas it got so far describe only part of the cache."""
        s = replica_stats(report)
        core = self.core
        try:
            unknown = self.service.update_stats(s)
        except UnknownModelError:
            return False
        self.replicas_info[s.replica_id] = report.replica
        self.latest[s.replica_id] = msgspec.structs.replace(report, stored=(), evicted=())
        if report.snapshot:
            core.replace_blocks(s.replica_id, report.stored)
        else:
            if report.stored:
                core.on_blocks_stored(s.replica_id, report.stored)
            if report.evicted:
                core.on_blocks_evicted(s.replica_id, report.evicted)
        self._wake()
        self.metrics.publish(self.service, self.replicas_info)
        return unknown and not report.snapshot

    def cached_blocks(self) -> dict[str, int]:
        """Replica id -> prefix-cache blocks the router's index holds for it."""
        return {rid: self.core.index.num_blocks(rid) for rid in self.replicas_info}

    def remove_replica(self, replica_id: str) -> bool:
        self.replicas_info.pop(replica_id, None)
        self.latest.pop(replica_id, None)
        return self.service.remove_replica(replica_id)

    def set_prefer_local_prefill(self, prefer: bool, forward: bool = True) -> None:
        """The autoscaler's network signal (it tells router 0): passed on to
        the other routers, which place other models or take over, and kept
        in ``router_state``, where a restarted router finds it."""
        if forward and self._persist and prefer != self._prefer_local:
            router_state.save_prefer_local(prefer)
        self._prefer_local = prefer
        self.core.set_prefer_local_prefill(prefer)
        for i in range(self.count) if forward else ():
            if i != self.index:
                try:
                    ray.get_actor(router_name(i), namespace=NAMESPACE) \
                        .set_prefer_local_prefill.remote(prefer, False)
                except ValueError:  # not created, or restarting: it learns the next change
                    pass

    # -- ingresses ------------------------------------------------------------------
    async def exchange(self, ex: Exchange | bytes) -> ExchangeReply | bytes:
        """An ingress's batch (``splitserve.router.exchange``): one outcome per
        call. Encoded (``splitserve.router.exchange_codec``, what RouterClient
        sends) it is answered encoded."""
        if isinstance(ex, bytes):
            return self._exchange_encoded(ex)
        self._ticker.ensure()
        reply = self.service.exchange(ex)
        if self.spans is not None:
            self.spans.exchange(ex, reply)
        self._wake()
        return reply

    def _exchange_encoded(self, data: bytes) -> bytes:
        """``exchange`` of encoded bytes: what both the actor call and the
        exchange stream answer."""
        self._ticker.ensure()
        ex = decode_exchange(data)
        reply = self.service.exchange(ex)
        if self.spans is not None:
            self.spans.exchange(ex, reply)
        self._wake()
        return encode_reply(reply)

    async def endpoint(self) -> StreamEndpoint:
        """Where this router takes exchanges and stats pushes over TCP, and
        the token a connection must open with (``router_stream``); it starts
        listening at the first ask, where its node's worker replicas bind
        (``node.bind_host``: ``$SPLITSERVE_BIND_HOST``, else the node's Ray
        address)."""
        self._ticker.ensure()
        if self._stream is None:
            # where the worker replicas bind (what the node's certificate names)
            host = await asyncio.to_thread(bind_host) if ray.is_initialized() else "127.0.0.1"
            try:
                tls = None if self._tls is None else TLSSpec(**self._tls).load()
            except Exception:  # callers keep to actor calls: never plaintext instead
                log.exception("router %d: its stream's TLS files cannot be read", self.index)
                raise
            if self._stream is None:  # not started by a call that overlapped this one
                self._stream = RouterStreamServer({EXCHANGE: self._exchange_encoded,
                                                   STATS: self._update_stats_encoded}, host, tls)
        return await self._stream.start()

    def set_stream_tls(self, tls: dict | None) -> None:
        """Serve the stream with ``tls`` (the ``transfer.tls`` section as a
        dict; None: plaintext) from now on (``ensure_routers`` keeps it in
        ``router_state`` for a restart). A change closes the open stream and
        its connections: the clients take the router for down, ask
        ``endpoint`` again and dial the new one (or keep to actor calls
        where their TLS differs)."""
        if tls == self._tls:
            return
        self._tls = tls
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _update_stats_encoded(self, data: bytes) -> bytes:
        """``update_stats`` of a msgpack ``StatsReport`` (a push over the
        stream): one byte back, 1 when the next push must be a snapshot."""
        return b"\x01" if self.update_stats(decode_report(data)) else b"\x00"

    async def poll(self, holder: str, timeout_s: float,
                   encoded: bool = False) -> list[tuple[str, Outcome]] | bytes:
        """Outcomes of ``holder``'s queued requests, as soon as there is one
        (or an empty list after ``timeout_s``: the ingress asks again);
        ``encoded``: as ``exchange_codec.encode_resolved`` bytes."""
        resolved = await self._poll(holder, timeout_s)
        return encode_resolved(resolved) if encoded else resolved

    async def _poll(self, holder: str, timeout_s: float) -> list[tuple[str, Outcome]]:
        self._ticker.ensure()
        if not self.service.has_resolved(holder):
            event = self._wakeups.setdefault(holder, asyncio.Event())
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                if self._wakeups.get(holder) is event:
                    del self._wakeups[holder]
        resolved = self.service.take_resolved(holder)
        if self.spans is not None:
            self.spans.resolved(resolved)
        return resolved

    def _wake(self) -> None:
        for holder, event in self._wakeups.items():
            if self.service.has_resolved(holder):
                event.set()

    def _tick(self) -> None:
        self.service.tick()
        self._wake()
        now = time.time()
        if now - self._last_prune > 1.0:
            self._last_prune = now
            self.prune(now)
        self.metrics.publish(self.service, self.replicas_info)

    # -- operators' views -----------------------------------------------------------
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
        self.metrics.publish(self.service, self.replicas_info, force=True)
        snaps = [self.core.snapshot(m) for m in self.core.cfg.models]
        held = {s.replica_id for snap in snaps for s in (*snap.prefill, *snap.decode)}
        return [r for rid, r in self.latest.items() if rid in held], render_prometheus().decode()

    def replicas(self) -> dict[str, Any]:
        """The operators' view (``splitserve status``): model -> router pool
        ("prefill", "decode") -> each replica's stats as a dict."""
        self.prune()
        out: dict[str, Any] = {}
        for model in self.core.cfg.models:
            snap = self.core.snapshot(model)
            out[model] = {Role.PREFILL.value: [_plain(s) for s in snap.prefill],
                          Role.DECODE.value: [_plain(s) for s in snap.decode]}
        return out

    def counters(self) -> dict[str, Any]:
        """The core's decision counters, plus admission and queue state:
        ``in_flight`` (slots held, per model), ``queued`` (per model),
        ``refusals`` by reason, the prefer-local-prefill switch, the slots
        each ingress process holds (``slots_by_holder``: holder -> count;
        a holder is ``node:pid:id``), and lease counts (``unbalanced_releases``,
        ``leases_expired``, ``leases_reclaimed``, ``leases_adopted``), and
        its stream's (``stream``: whether it serves TLS, and the ``exchange``
        and ``stats`` connections it accepted; None before any ``endpoint``)."""
        svc = self.service
        stream = None
        if self._stream is not None and self._stream.started:
            n = self._stream.accepted
            stream = {"tls": self._tls is not None, "exchange": n.get(EXCHANGE, 0),
                      "stats": n.get(STATS, 0)}
        return {**asdict(self.core.counters()), "queued": svc.queued(),
                "prefer_local_prefill": self.core.state.prefer_local_prefill,
                "slots_by_holder": {h: sum(1 for _ in svc.leases.of_holder(h))
                                    for h in svc.leases.holders()},
                "refusals": dict(svc.refusals), "incarnation": svc.incarnation,
                "queued_total": svc.counts["queued"], "stream": stream,
                **{k: svc.counts[k] for k in ("unbalanced_releases", "leases_expired",
                                               "leases_reclaimed", "leases_adopted")}}


def get_router(create_with: RouterConfig | None = None, index: int = 0, count: int = 1,
               tracing: dict | None = None, tls: dict | None = None):
    """Router ``index``'s actor (of ``count``); created (detached) if
    ``create_with`` is given (``tracing``: its ``observability.tracing``;
    ``tls``: its ``transfer.tls``)."""
    name = router_name(index)
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        if create_with is None:
            raise
    return RouterActor.options(name=name, namespace=NAMESPACE, lifetime="detached",
                               get_if_exists=True, scheduling_strategy=_node_for(index)).remote(create_with, index=index, count=count,
                                                          tracing=tracing, tls=tls)


def _node_for(index: int) -> NodeAffinitySchedulingStrategy | str:
    """Router ``index`` on the ``index``-th live node (by node id, round robin), so
    that one node's loss leaves a standby router up while Ray restarts the lost
    one; soft: elsewhere when that node is gone (a restart after its loss)."""
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    if not nodes:
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=True)


def ensure_routers(cfg: RouterConfig, count: int, reconfigure: bool = False,
                   tracing: dict | None = None, tls: dict | None = None) -> list:
    """Routers 0..count-1, created where missing (and reconfigured when
    asked, with ``tracing``, the ``observability.tracing`` section as a
    dict), their streams serving ``tls`` (the ``transfer.tls`` section as a
    dict, or None: plaintext); routers numbered ``count`` and above are
    removed."""
    router_state.save_stream_tls(tls)  # where a router Ray restarts finds it
    handles = []
    for i in range(count):
        try:
            h = ray.get_actor(router_name(i), namespace=NAMESPACE)
            if reconfigure:
                ray.get(h.reconfigure.remote(cfg, tracing))
            ray.get(h.set_stream_tls.remote(tls))
        except ValueError:
            h = get_router(create_with=cfg, index=i, count=count, tracing=tracing, tls=tls)
        handles.append(h)
    kill_routers(start=count)
    return handles


def kill_routers(start: int = 0) -> None:
    """Remove routers ``start`` and above; all of them (``start`` 0) also
    forgets their stored state (``router_state``)."""
    for i in range(start, MAX_ROUTERS):
        try:
            ray.kill(ray.get_actor(router_name(i), namespace=NAMESPACE))
        except ValueError:
            pass
    if start == 0:
        router_state.clear()


def _plain(stats) -> dict[str, Any]:
    """A replica's stats as plain data (adapter sets as sorted lists, for JSON)."""
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in asdict(stats).items()}
