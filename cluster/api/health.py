"""Probes, with Kubernetes' meanings, for HTTP and gRPC.

  GET /health   liveness: 200 while this ingress process serves requests
                (it asks nothing of the cluster: a liveness probe must not
                restart the ingress because a pool is down)
  GET /ready    readiness: 200 only when the API answers for every model:
                it is in this ingress' model table, the router its requests
                go to serves it and counts a live replica in each of its
                required pools, and no ingress replica of an earlier config
                still takes requests (``Backend.readiness``); else 503 with a
                body naming each pool that has none and any other reason
  GET /version  {"version": splitserve's version}

The gRPC ``grpc.health.v1`` service follows the same readiness: "" and the
Generation service are SERVING only while the backend is ready (and
``set_serving(False)`` has not taken them out, e.g. while draining).

A pool is required unless requests are served without it: a prefill pool
may be empty, since decode replicas then prefill (the router places every
prompt on decode while no prefill replica is live). A prefill pool whose
min_replicas is above 0 and that has no live replica (its node was lost)
leaves /ready at 200, naming the pool under ``degraded``: taking the API out
of a load balancer's rotation would stop requests it still answers.
``splitserve deploy`` still waits for such a pool
(``splitserve.cluster.serve.app.wait_for_pools``).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import grpc
from fastapi import FastAPI
from starlette.responses import JSONResponse

import splitserve
from splitserve.cluster.api.backend import Backend, PoolReadiness, Readiness
from splitserve.cluster.api.openai_schema import ApiError
from splitserve.cluster.api.proto import health_pb2, health_pb2_grpc
from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.config import ClusterConfig
from splitserve.engine.roles import Role

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
WATCH_POLL_S = 1.0  # how often a gRPC Watch re-reads the backend's readiness
_Serving = health_pb2.HealthCheckResponse


def cluster_readiness(cfg: ClusterConfig, live: dict[str, dict[str, int]],
                      problems: tuple[str, ...] = ()) -> Readiness:
    """``live``: model -> role -> live replicas, as the router counts them
    (``RouterActor.live_replicas``); ``problems``: other reasons not to be
    ready (``Readiness.problems``)."""
    pools = []
    for served in cfg.models:
        name = served.model.name
        for role in served.roles():
            # decode (or colocated) replicas answer every request; prefill
            # replicas only speed them up
            required = role.pool is not Role.PREFILL
            pools.append(PoolReadiness(name, role.value, live.get(name, {}).get(role.value, 0),
                                       required, served.pool(role).min_replicas > 0))
    return Readiness(tuple(pools), problems=problems)


def add_health_routes(app: FastAPI, backend: Backend) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        r = await backend.readiness()
        if r.ready:
            return JSONResponse(r.to_dict())
        err = ApiError(503, r.reason(), "service_unavailable", code="not_ready")
        return JSONResponse({**r.to_dict(), **err.body()}, status_code=503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": splitserve.__version__}


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" (the server) and the Generation service are SERVING
    while ``readiness()`` says ready (no function: always) and until
    ``set_serving(False)`` (e.g. while draining; call it on the server's
    event loop). ``start_grpc_server`` makes it follow its backend."""

    def __init__(self, readiness: Callable[[], Awaitable[Readiness]] | None = None):
        self._readiness = readiness
        self._serving = True
        self._changed = asyncio.Event()

    def follow(self, backend: Backend) -> None:
        """Report the backend's readiness, unless given a function already."""
        if self._readiness is None:
            self._readiness = backend.readiness

    def set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    async def _status(self, service: str) -> int | None:
        if service not in ("", SERVICE_NAME):
            return None
        if not self._serving:
            return _Serving.NOT_SERVING
        if self._readiness is not None and not (await self._readiness()).ready:
            return _Serving.NOT_SERVING
        return _Serving.SERVING

    async def Check(self, request, context) -> health_pb2.HealthCheckResponse:
        status = await self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:  # until the client cancels
            changed = self._changed  # taken before the status: no change slips between
            status = await self._status(request.service)
            status = _Serving.SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            try:  # a drain flag wakes it at once; readiness is polled
                await asyncio.wait_for(changed.wait(), WATCH_POLL_S)
            except asyncio.TimeoutError:
                pass
