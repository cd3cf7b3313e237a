"""The prefill, decode and colocated pools as Ray Serve deployments.

Serve owns each pool's lifecycle: replica counts and bounds, placement by
``ray_actor_options`` (CPUs/GPUs, a custom resource naming the node type),
health checks, autoscaling and graceful drain. A replica builds one engine,
serves the worker RPCs (``splitserve.handoff.rpc``) on its node's address, and pushes
its stats and prefix-cache events to the router actor every period. Requests
do not flow through Serve's handles: the router picks the exact replica
pair, which Serve's own request routing cannot express.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray import serve

from splitserve.cluster.config import ModelSpec, RouterSpec, TransferSpec
from splitserve.cluster.observability.metrics import record_worker_metrics
from splitserve.cluster.serve.node import bind_host
from splitserve.cluster.serve.router_fanout import RouterFanout
from splitserve.engine.roles import Role
from splitserve.engine.stats import WorkerStats, stats_to_wire
from splitserve.handoff.tracing import ATTR_MODEL, ATTR_REPLICA, ATTR_TRANSPORT
from splitserve.router.reports import ReplicaInfo, StatsReport

log = logging.getLogger("splitserve.worker")
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(64 << 20)}


# model settings only the ingress reads: editing them rebuilds no worker replica
# (adapters: requests carry the adapter they run with, replicas read it then)
INGRESS_ONLY_FIELDS = {"tool_call_parser", "reasoning_parser", "chat_template", "adapters"}


def speculative_config(spec: ModelSpec, role: Role):
    """The engine's speculative decoding settings for a replica of ``role``:
    None on prefill replicas (they sample one token) and when off."""
    sp = spec.speculative
    if sp is None or role is Role.PREFILL:
        return None
    from splitserve.engine.spec.config import SpeculativeConfig

    draft = None
    if sp.draft_model is not None:
        from splitserve.engine.hub import resolve_checkpoint

        draft = str(resolve_checkpoint(sp.draft_model, sp.draft_revision))
    return SpeculativeConfig(
        method=sp.method, num_speculative_tokens=sp.num_speculative_tokens, draft_model=draft,
        ngram_min=sp.ngram_min, ngram_max=sp.ngram_max, adaptive=sp.adaptive,
        disable_batch_size=sp.disable_batch_size, saturation_tokens=sp.saturation_tokens,
        draft_num_blocks=sp.draft_num_blocks)


def build_engine(spec: ModelSpec, role: Role = Role.DECODE):
    import torch

    from splitserve.cluster.serve.checkpoints import checkpoint_dir
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # one intra-op thread per CPU this replica was given, so replicas
        # sharing a node do not oversubscribe its cores
        # (its tensor-parallel ranks, processes of their own, take as many as rank 0)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus / spec.tensor_parallel_size)))
    return LLMEngine(EngineConfig(
        model=str(checkpoint_dir(spec)), model_id=spec.name,
        dtype=None if spec.dtype == "auto" else spec.dtype, device=device,
        block_size=spec.block_size, num_blocks=spec.num_blocks,
        kv_cache_memory_gb=spec.kv_cache_memory_gb, kv_cache_dtype=spec.kv_cache_dtype,
        weight_dtype=spec.weight_dtype,
        max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=spec.max_model_len, enable_prefix_caching=spec.enable_prefix_caching,
        state_checkpoints=spec.state_checkpoints,
        max_loras=spec.max_loras, max_lora_rank=spec.max_lora_rank,
        max_cpu_loras=spec.max_cpu_loras,
        enforce_eager=spec.enforce_eager, tensor_parallel_size=spec.tensor_parallel_size,
        speculative=speculative_config(spec, role),
    ))


@dataclass(frozen=True)
class RoleWorker:
    """A role's worker, started, and the worker RPCs it serves besides ``Stats``."""

    worker: Any  # PrefillWorker or DecodeWorker: start()ed, with stats(), aengine, stop()
    unary: dict[str, Any]
    streams: dict[str, Any]
    kv_endpoint: str  # where prefill replicas send KV to it; "" for prefill


def start_prefill(engine, transfer: TransferSpec, tcfg, cluster_token: str,
                  tracer=None) -> RoleWorker:
    from splitserve.handoff.transfer.base import get_transport
    from splitserve.prefill.worker import PrefillWorker

    sender_cls, _ = get_transport(transfer.transport)
    w = PrefillWorker(engine, sender_cls(tcfg), transfer.layer_group_size,
                      transfer.timeout_s, tracer=tracer).start()
    return RoleWorker(w, {"Prefill": w.prefill}, {}, "")


def start_decode(engine, transfer: TransferSpec, tcfg, cluster_token: str,
                 tracer=None) -> RoleWorker:
    from splitserve.decode.worker import DecodeWorker
    from splitserve.handoff.transfer.base import get_transport

    _, receiver_cls = get_transport(transfer.transport)
    w = DecodeWorker(engine, receiver_cls(tcfg), cluster_token, transfer.on_prefill_failure,
                     transfer.lease_s, transfer.prefill_timeout_s, tls=tcfg.tls,
                     tracer=tracer).start()
    return RoleWorker(w, {}, {"Generate": w.generate}, w.kv_endpoint)


# A colocated replica is a decode replica that gets no prefill placements:
# its DecodeWorker prefills every prompt itself.
ROLE_WORKERS: dict[Role, Callable[..., RoleWorker]] = {
    Role.PREFILL: start_prefill, Role.DECODE: start_decode, Role.COLOCATED: start_decode}


class WorkerServer:
    """One replica of a pool: the worker of its ``role`` (``ROLE_WORKERS``)."""

    async def __init__(self, role: Role | str, model: dict, transfer: dict, router: dict,
                       secrets_version: str, drain_timeout_s: float = 25.0,
                       tracing: dict | None = None):
        from splitserve.cluster.observability.tracing import start_tracer
        from splitserve.cluster.serve import secrets
        from splitserve.handoff import rpc
        from splitserve.handoff.protocol import engine_layout
        from splitserve.handoff.transfer.base import TransportConfig

        self.role = Role(role)
        self.spec = ModelSpec(**model)
        self.transfer = TransferSpec(**transfer)
        self.router_spec = RouterSpec(**router)
        self.host = bind_host(self.transfer.bind_host)
        node_id = ray.get_runtime_context().get_node_id()
        # the cluster token comes from the secret store, never through init
        # arguments (secrets_version, the token's version: only a new token
        # rebuilds replicas)
        cluster_token = secrets.cluster_token()
        # one TLS config for both planes, served and dialed (read on this node)
        tls = self.transfer.tls.load() if self.transfer.tls is not None else None
        # spans of this replica (observability.tracing); None: not traced
        self.tracer = start_tracer(tracing, self.role.value)
        engine = build_engine(self.spec, self.role)
        self.engine = engine
        tcfg = TransportConfig(token=cluster_token, host=self.host, tls=tls,
                               chunk_bytes=self.transfer.chunk_bytes,
                               max_message_bytes=self.transfer.chunk_bytes + (1 << 20),
                               device=str(engine.device), layout=engine_layout(engine))
        started = ROLE_WORKERS[self.role](engine, self.transfer, tcfg, cluster_token,
                                          self.tracer)
        self.worker = started.worker
        unary = {**started.unary, "Stats": self._stats_reply}
        self.server, self.address = await rpc.serve(unary, started.streams, cluster_token,
                                                    host=self.host, tls=tls)
        self.replica = ReplicaInfo(replica_id=self.address, role=self.role, model=self.spec.name,
                                   kv_endpoint=started.kv_endpoint, node_id=node_id)
        if self.tracer is not None:
            self.tracer.common.update({ATTR_REPLICA: self.address, ATTR_MODEL: self.spec.name,
                                       ATTR_TRANSPORT: self.transfer.transport})
        # every router hears every push (over its stream: TLS as the planes)
        self.router = RouterFanout(self.router_spec.routers, tls=tls,
                                   timeout_s=max(5.0, 4 * self.router_spec.stats_period_s))
        self.draining = False
        self.drain_timeout_s = drain_timeout_s
        self._last_push_warning = float("-inf")
        self._snapshot_next = True  # the router learns this replica's cache as a whole first
        self._push_task = asyncio.get_running_loop().create_task(self._push_loop())
        log.info("%s replica of %s serving on %s", self.role, self.spec.name, self.address)

    @property
    def replica_id(self) -> str:
        return self.replica.replica_id

    async def _stats_reply(self, _req: dict) -> dict:
        """The ``Stats`` worker RPC: this replica's stats as a msgpack map."""
        return stats_to_wire(await self.worker.stats())

    # -- stats to the router ----------------------------------------------------
    async def _push_loop(self) -> None:
        period = self.router_spec.stats_period_s
        while True:
            try:
                await self.push_stats()
            except Exception as e:  # noqa: BLE001 - the router may be restarting
                now = time.monotonic()
                if now - self._last_push_warning > 30.0:
                    self._last_push_warning = now
                    log.warning("stats push to the router failed: %r", e)
            await asyncio.sleep(period)

    async def push_stats(self) -> None:
        s = await self.worker.stats()
        record_worker_metrics(self.role, self.spec.name, s)
        snapshot, self._snapshot_next = self._snapshot_next, False

        def drain(e):
            if snapshot:
                e.kv.pool.request_snapshot()
            return e.kv.pool.drain_events()

        ev = await self.worker.aengine.call(drain)
        report = StatsReport(replica=self.replica, stats=s, healthy=self.worker.aengine.alive,
                             draining=self.draining, updated_at=time.time(),
                             stored=tuple(ev.stored), evicted=tuple(ev.evicted),
                             snapshot=ev.snapshot)
        try:
            self._snapshot_next = await self.router.push(report)
        except BaseException:
            self._snapshot_next = True  # these events may be lost: send the whole cache next
            raise

    # -- Serve hooks --------------------------------------------------------------
    async def check_health(self) -> None:
        if not self.worker.aengine.alive:
            raise RuntimeError(f"engine thread is dead: {self.worker.aengine.error!r}")

    async def info(self) -> ReplicaInfo:
        return self.replica

    async def stats(self) -> WorkerStats:
        return await self.worker.stats()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for the pool's Serve autoscaling policy
        (``splitserve.cluster.autoscaling.serve_policy``); Serve calls it periodically."""
        from splitserve.cluster.autoscaling.signals import replica_metrics
        from splitserve.cluster.observability.telemetry import replica_gpu_telemetry

        return replica_metrics(await self.worker.stats(), self.draining, replica_gpu_telemetry())

    # -- graceful drain -------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> bool:
        """Take no new work and wait (at most ``timeout_s``) until in-flight
        requests finish. Returns whether the replica went idle in time."""
        deadline = time.monotonic() + (self.drain_timeout_s if timeout_s is None else timeout_s)
        self.draining = True
        try:
            await self.push_stats()  # the router stops placing work here
        except Exception as e:  # noqa: BLE001 - it also learns it from the periodic push
            log.warning("could not tell the router this replica drains: %r", e)
        # placements made before the router saw the flag may still arrive
        settle = 2 * self.router_spec.stats_period_s + 0.5
        await asyncio.sleep(max(0.0, min(settle, deadline - time.monotonic())))
        while True:
            if (await self.worker.stats()).in_flight() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def __del__(self) -> None:
        # Serve calls this when the replica is removed (scale-down, update,
        # shutdown), at most graceful_shutdown_timeout_s before killing it
        try:
            idle = await self.drain()
            if not idle:
                log.warning("%s still busy after %.0fs of draining; stopping anyway",
                            self.address, self.drain_timeout_s)
            self.router.remove_replica(self.replica_id)
            # refuses new RPCs (clients place them again), lets running ones end
            await self.server.stop(2.0)
            self._push_task.cancel()
            self.router.close()  # its streams to the routers
            await self.worker.stop()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        if self.tracer is not None:  # the spans still batched go out before the process ends
            await asyncio.to_thread(self.tracer.shutdown)
        self.engine.close()  # its tensor-parallel ranks, if any


# Serve rounds a surge up to whole replicas: 1% is one extra replica for
# pools of up to 100
SURGE_PERCENT = 1


def worker_deployment(name: str, role: Role, pool, model: ModelSpec, transfer: TransferSpec,
                      router: RouterSpec, secrets_version: str, tracing=None):
    """A bound Serve application for one pool of one model; ``tracing``:
    the ``observability.tracing`` section (a ``TracingSpec``) or None."""
    from splitserve.cluster.autoscaling.deployment_options import replica_version, serve_autoscaling_config

    initial = pool.initial_replicas if pool.initial_replicas is not None else pool.min_replicas
    scaling = {} if pool.autoscaling is None else {
        "autoscaling_config": serve_autoscaling_config(pool, role.value, model.name)}
    # the drain must end before Serve's force-kill at graceful_shutdown_timeout_s
    drain_s = max(0.5, pool.graceful_shutdown_timeout_s - 3.0)
    # what only the ingress reads stays out, so editing it does not rebuild replicas
    worker_model = model.model_dump(exclude=INGRESS_ONLY_FIELDS)
    args = (role, worker_model, transfer.model_dump(), router.model_dump(), secrets_version, drain_s,
            None if tracing is None else tracing.model_dump())
    actor_options = pool.ray_actor_options(model.tensor_parallel_size)
    # glibc keeps freed memory instead of unmapping it: gRPC's per-message
    # buffers then skip an mmap and page faults (benchmarks/bench_transfer.py)
    env = actor_options.setdefault("runtime_env", {}).setdefault("env_vars", {})
    for key, value in WORKER_MALLOC_ENV.items():
        env.setdefault(key, value)
    dep = serve.deployment(WorkerServer).options(
        name=name,
        num_replicas=max(initial, pool.min_replicas, 1) if pool.autoscaling is None else None,
        ray_actor_options=actor_options,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        max_ongoing_requests=1000,
        # replacing the replicas (a new build: engine, router or transfer
        # settings, cluster token) starts one new replica before an old one
        # drains, never the other way round: a pool of one replica keeps
        # serving through the rollout instead of having none for a drain and
        # a model load (Serve's default, kept with rollout_surge false, stops
        # old replicas first)
        max_surge_percent=SURGE_PERCENT if pool.rollout_surge else 0,
        **scaling,
    )
    # a version that changes only when replicas must be rebuilt: re-applying an
    # edited autoscaling section reconfigures the running replicas in place
    dep = dep.options(version=replica_version(args, actor_options), _internal=True)
    return dep.bind(*args)
