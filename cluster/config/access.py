"""The ``auth``, ``endpoints`` and ``observability`` sections: who may reach
the cluster, where, and which routes answer without a key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import _Strict, host_problem, is_loopback_host
from .tracing import TracingSpec


class AuthSpec(_Strict):
    api_keys: list[str] = Field(default_factory=list, description="Client keys (HTTP Bearer, gRPC "
                                "metadata), added to those of api_keys_file and api_keys_env; "
                                "none at all: no client auth (loopback only, see "
                                "endpoints.allow_unauthenticated).")
    api_keys_file: str | None = Field(None, description="File on the ingress nodes with one "
                                      "client key per line (# starts a comment), e.g. a mounted "
                                      "Kubernetes Secret.")
    api_keys_env: str | None = Field(None, description="Environment variable of the ingress "
                                     "nodes holding comma-separated client keys.")
    cluster_token: str | None = Field(None, description="Secret the internal planes (worker RPC, "
                                      "KV transfer) share. None: cluster_token_file, else "
                                      "$SPLITSERVE_CLUSTER_TOKEN, else a random token made at the "
                                      "first deploy and kept in the cluster's secret store.")
    cluster_token_file: str | None = Field(None, description="File holding the cluster token, "
                                           "read where `splitserve deploy` runs.")

    @model_validator(mode="after")
    def _no_blank_secrets(self) -> "AuthSpec":
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("api_keys: a key is empty")
        if self.cluster_token is not None and not self.cluster_token.strip():
            raise ValueError("cluster_token: empty (leave it unset for a random one)")
        return self

    def has_api_keys(self) -> bool:
        """Whether client auth is configured (from any source)."""
        return bool(self.api_keys or self.api_keys_file or self.api_keys_env)


class EndpointSpec(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP and gRPC APIs listen on.")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI HTTP API port.")
    http_server: Literal["proxy", "ingress"] = Field(
        "proxy", description="Who serves the OpenAI HTTP API on http_port. proxy: Ray Serve's "
        "HTTP proxy, on every node, passing each request to an ingress replica (one more hop: "
        "about 12 ms of time to first token on a small host; Serve queues requests while no "
        "replica runs). ingress: each ingress replica serves it itself, replicas on one node "
        "sharing the port (SO_REUSEPORT), as for gRPC: no hop, but only nodes running an "
        "ingress replica answer, and while a lone replica is replaced connections are refused. "
        "Fixed when Serve starts: switching it on a running cluster is refused.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC API port.")
    ingress_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the ingress (the Serve deployment that serves "
        "both APIs). Serve's proxy spreads HTTP requests over them (http_server proxy); each "
        "serves gRPC on grpc_port (and, with http_server ingress, HTTP on http_port), replicas "
        "on one node sharing the port (SO_REUSEPORT: the kernel spreads new connections). 1 suits one machine (`splitserve serve`, tests); 2 or more keep "
        "the API answering while Serve replaces a replica that died.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=1 << 30, description="Largest HTTP "
                                "request body (at most 1 GiB: an ingress holds a body whole "
                                "before it parses it).")
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="How long an HTTP "
                                  "request's body may take to arrive, from when the request "
                                  "reaches the API; a body still incomplete then (a client that "
                                  "stalls or trickles it) is answered 408 and its connection "
                                  "closed. Bounds the body only: request headers that never "
                                  "finish are bounded by head_timeout_s (http_server ingress "
                                  "only; see docs/operators.md).")
    head_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="With http_server "
                                  "ingress: how long a connection's request head (request line "
                                  "and headers) may take to arrive, from the connection opening "
                                  "or its previous response ending; a connection without a "
                                  "complete head by then (idle keep-alive, a client dripping its "
                                  "headers) is closed. Serve's proxy (http_server proxy) has no "
                                  "such bound.")
    drain_s: float = Field(10.0, ge=0.0, le=3600.0, description="When an ingress replica "
                           "stops (a redeploy, a scale-down), how long its in-flight gRPC "
                           "streams, and with http_server ingress its HTTP ones, may run on "
                           "after it stopped accepting connections; those still running then "
                           "are cut.")
    grpc_tls_cert: str | None = Field(None, description="PEM certificate file for gRPC TLS.")
    grpc_tls_key: str | None = Field(None, description="PEM key file for gRPC TLS.")
    http_tls_cert: str | None = Field(None, description="PEM certificate file for HTTPS on "
                                      "http_port.")
    http_tls_key: str | None = Field(None, description="PEM key file for HTTPS on http_port.")
    allow_unauthenticated: bool = Field(False, description="Serve on a non-loopback host without "
                                        "API keys. Off: such a config is refused, since anyone "
                                        "who reaches the port gets free inference.")

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        problem = host_problem(host)
        if problem:
            raise ValueError(problem)
        return host

    @model_validator(mode="after")
    def _replicas_share_a_port(self) -> "EndpointSpec":
        if self.ingress_replicas > 1 and self.grpc_port == 0:
            raise ValueError("grpc_port 0 (a free port) with ingress_replicas > 1: each replica "
                             "would listen on a different port; set a fixed grpc_port")
        if self.http_server == "ingress" and self.http_port == 0:
            raise ValueError("http_port 0 (a free port) with http_server ingress: each ingress "
                             "replica would listen on a port of its own, which no client is "
                             "told; set a fixed http_port")
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> "EndpointSpec":
        for proto in ("grpc", "http"):
            if (getattr(self, f"{proto}_tls_cert") is None) != (getattr(self, f"{proto}_tls_key") is None):
                raise ValueError(f"{proto}_tls_cert and {proto}_tls_key go together (PEM files)")
        return self

    def is_loopback(self) -> bool:
        """Whether the APIs listen on this machine only."""
        return is_loopback_host(self.host)


class ObservabilitySpec(_Strict):
    unauthenticated_routes: list[Literal["health", "metrics"]] = Field(
        default_factory=list, description="Routes answered without an API key: health = "
        "/health, /ready, /version and the gRPC health service (for Kubernetes probes); "
        "metrics = /metrics (for a Prometheus that holds no key). Default: every route "
        "needs the key when keys are configured.")
    vllm_metric_names: bool = Field(False, description="/metrics also exports vLLM's metric "
                                    "names (vllm:time_to_first_token_seconds, ...) so rules and "
                                    "gateways written for vLLM work; see docs/operators.md.")
    tracing: TracingSpec | None = Field(None, description="OpenTelemetry traces of each "
                                        "request's phases across processes, exported over "
                                        "OTLP/gRPC. None: only $OTEL_EXPORTER_OTLP_ENDPOINT "
                                        "turns tracing on (with the tracing extra installed).")
