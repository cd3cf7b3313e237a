"""The client-facing ingress as a Ray Serve deployment.

HTTP (OpenAI API) arrives through Serve's proxy (``endpoints.http_server``
proxy), or each replica serves it itself on ``endpoints.http_port``
(``ingress``: uvicorn on a shared ``SO_REUSEPORT`` socket,
splitserve.cluster.api.http_server; one app, so /ready, /metrics and
/health answer the same either way); each replica also runs the gRPC API
server on ``endpoints.grpc_port``. Both call one ``ClusterBackend``, which
asks the router for placements and streams from decode replicas.
With ``observability.tracing`` (or $OTEL_EXPORTER_OTLP_ENDPOINT) each
generation request is a trace's ``ingress`` span; the replica exports what
is left of its spans when it stops.

There are ``endpoints.ingress_replicas`` replicas. Serve's proxy spreads
HTTP requests over them. Their gRPC servers (and HTTP servers, in ingress
mode) on one node bind the same port (``SO_REUSEPORT``,
``start_grpc_server``), and the kernel spreads new connections over the
listening sockets; a replica that dies closes its socket, and clients that
reconnect reach another. Each replica holds its own admission slots at the
routers (one lease holder per process): the slots of a replica that dies
expire after ``router.lease_ttl_s``.

Stopping (a redeploy, a scale-down, ``splitserve shutdown``): Serve counts only
the requests that came through it, so ``__del__`` drains the replica's own
servers: both stop accepting at once (the node's other replicas keep the
ports), their in-flight streams run on for at most ``endpoints.drain_s``,
then the backend closes. The deployment's ``graceful_shutdown_timeout_s``
leaves room for that drain before Serve kills the replica.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.serve.rollout import (IngressRollout, drop_unread_endpoints, ingress_digest,
                                              publish_target)

log = logging.getLogger("splitserve.ingress")
SHUTDOWN_MARGIN_S = 10.0


@serve.ingress()
class Ingress:
    async def __init__(self, cfg: dict, secrets_version: str):
        from splitserve.cluster.api.grpc_api import start_grpc_server
        from splitserve.cluster.api.http_server import start_http_server
        from splitserve.cluster.api.openai_api import build_http_app
        from splitserve.cluster.observability.tracing import start_tracer
        from splitserve.cluster.serve import secrets
        from splitserve.cluster.serve.adapter_store import AdapterStore
        from splitserve.cluster.serve.orchestrator import ClusterBackend

        # cfg carries no secret: the keys and the token come from the
        # cluster's secret store (secrets_version only rolls the replica
        # when they change)
        self.cfg = ClusterConfig.model_validate(cfg)
        self.api_keys = secrets.api_keys(self.cfg.auth)
        self.tracer = start_tracer(self.cfg.observability.tracing, "ingress")
        # registered before it serves: while it lives, no replica of another
        # config is ready (splitserve.cluster.serve.rollout)
        self.rollout = IngressRollout(ingress_digest(self.cfg, secrets_version))
        await asyncio.to_thread(self.rollout.beat)
        self.rollout.start()
        self.backend = ClusterBackend(self.cfg, token=secrets.cluster_token(), tracer=self.tracer,
                                      rollout_problems=self.rollout.problems,
                                      adapter_store=AdapterStore())
        # the routes' weights and the runtime-loaded adapters in force, then every period
        await self.backend.start()
        ep = self.cfg.endpoints
        self.grpc_server, self.grpc_port = await start_grpc_server(
            self.backend, ep.host, ep.grpc_port, self.api_keys,
            tls_cert=ep.grpc_tls_cert, tls_key=ep.grpc_tls_key,
            open_health="health" in self.cfg.observability.unauthenticated_routes,
            tracer=self.tracer)
        log.info("gRPC API on %s:%s", ep.host, self.grpc_port)
        self.http_app = build_http_app(self.backend, self.api_keys, ep.max_body_bytes,
                                       observability=self.cfg.observability, tracer=self.tracer,
                                       body_timeout_s=ep.body_timeout_s)
        self.http_server = None
        if ep.http_server == "ingress":
            self.http_server = await start_http_server(
                self.http_app, ep.host, ep.http_port, ep.http_tls_cert, ep.http_tls_key,
                head_timeout_s=ep.head_timeout_s)
            log.info("OpenAI HTTP API on %s:%s", ep.host, ep.http_port)

    def __serve_build_asgi_app__(self):
        # what Serve's proxy forwards to (proxy mode); in ingress mode no proxy runs
        return self.http_app

    async def readiness_report(self) -> dict:
        """What /ready answers (``Readiness.to_dict``); ``splitserve deploy`` waits on it."""
        return (await self.backend.readiness()).to_dict()

    async def check_health(self) -> None:
        # a replica whose own HTTP server ended is replaced by Serve
        if self.http_server is not None and not self.http_server.serving:
            raise RuntimeError("the ingress replica's HTTP server is no longer serving")

    async def drain(self) -> None:
        """Stop accepting on both APIs, let their in-flight streams finish
        for at most ``endpoints.drain_s``; the backend stays open meanwhile."""
        grace = self.cfg.endpoints.drain_s
        stops = [self.grpc_server.stop(grace)]
        if self.http_server is not None:
            stops.append(self.http_server.stop(grace))
        await asyncio.gather(*stops)

    async def __del__(self) -> None:
        try:
            await asyncio.to_thread(self.rollout.stop)
        except Exception:  # noqa: BLE001 - best effort: the entry ages out
            pass
        try:
            await self.drain()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.exception("draining the ingress replica failed")
        try:
            await self.backend.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)


def ingress_app(cfg: ClusterConfig, secrets_version: str):
    """The ingress deployment of ``cfg``, bound; publishes its config as the
    cluster's target (``rollout``): replicas of any other config stop being
    ready now (needs a connected Ray driver)."""
    publish_target(ingress_digest(cfg, secrets_version))
    args = ingress_args(cfg)
    dep = serve.deployment(Ingress).options(
        name="ingress", num_replicas=cfg.endpoints.ingress_replicas,
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, health_check_period_s=5.0,
        # Serve waits up to graceful_shutdown_wait_loop_s (2 s) for its own
        # requests before __del__ drains the replica's servers (drain_s), then
        # closes the backend: the margin keeps Serve from killing it first
        graceful_shutdown_timeout_s=cfg.endpoints.drain_s + SHUTDOWN_MARGIN_S)
    return dep.bind(args, secrets_version)


def ingress_args(cfg: ClusterConfig) -> dict:
    """What an ingress replica is built from: ``cfg`` without its secrets,
    its replica count (the deployment's: changing it scales the ingress
    without replacing the replicas that run) and the endpoint settings its
    HTTP mode does not read (changing those replaces no replica either)."""
    from splitserve.cluster.serve.secrets import public_config

    args = public_config(cfg)
    args["endpoints"].pop("ingress_replicas")
    drop_unread_endpoints(args["endpoints"])
    return args
