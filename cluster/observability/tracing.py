"""Whether this process traces, and the span of the request it is serving.

``start_tracer`` turns the ``observability.tracing`` section (or, without
one, ``$OTEL_EXPORTER_OTLP_ENDPOINT``) into a ``splitserve.handoff.tracing.Tracer``
over OpenTelemetry, or None when tracing is off. OpenTelemetry is imported
only then (``splitserve.cluster.observability.otel``): an untraced process
never loads it, and every component holding the None checks only that.
Configured in the operator file but not installed (the ``tracing`` extra) is
an error naming the fix; configured only by the environment, a warning.

The ingress keeps its request's span in a context variable
(``ingress_span``), set by the HTTP middleware
(``splitserve.cluster.api.http_tracing``) and the gRPC service, read by
``ClusterBackend.generate``, which attaches the request's attributes and
passes the span's traceparent on to the router and the decode replica.
"""

from __future__ import annotations

import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import unquote

from splitserve.cluster.config import ConfigError, TracingSpec
from splitserve.handoff.tracing import Span, Tracer

log = logging.getLogger("splitserve.tracing")

# the OTLP exporter's own variables, traces-specific first
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL_HINT = "pip install 'splitserve[tracing]'"


class TracingUnavailableError(ConfigError):
    """Tracing is configured but cannot start here (its packages are not
    installed, or a variable it names is not set)."""


@dataclass(frozen=True)
class ExportSettings:
    """Where and how one process exports its spans (resolved on its node)."""

    endpoint: str
    service_name: str
    sample_ratio: float
    insecure: bool | None
    ca_file: str | None
    client_cert_file: str | None
    client_key_file: str | None
    headers: tuple[tuple[str, str], ...]  # () : the exporter reads $OTEL_EXPORTER_OTLP_HEADERS
    schedule_delay_ms: int
    timeout_s: float


def parse_headers(text: str, source: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key2=value2`` (values URL-encoded, as in
    $OTEL_EXPORTER_OTLP_HEADERS) as gRPC metadata."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise TracingUnavailableError(f"{source}: {item.strip()[:40]!r} is not key=value")
        out.append((key, unquote(value.strip())))
    return tuple(out)


def export_settings(spec: TracingSpec | None,
                    environ: Mapping[str, str] = os.environ) -> ExportSettings | None:
    """The settings of ``spec`` on this node, or None when tracing is off:
    no endpoint in the spec nor in the environment."""
    endpoint = spec.endpoint if spec is not None else None
    endpoint = endpoint or next((environ[k] for k in ENDPOINT_ENVS if environ.get(k)), None)
    if not endpoint:
        return None
    spec = spec or TracingSpec()
    headers = tuple(spec.headers.items())
    if spec.headers_env:
        text = environ.get(spec.headers_env)
        if text is None:
            raise TracingUnavailableError(
                f"observability.tracing.headers_env: ${spec.headers_env} is not set on this node")
        headers += parse_headers(text, f"${spec.headers_env}")
    return ExportSettings(endpoint, spec.service_name, spec.sample_ratio, spec.insecure,
                          spec.ca_file, spec.client_cert_file, spec.client_key_file, headers,
                          spec.schedule_delay_ms, spec.timeout_s)


def start_tracer(spec: TracingSpec | dict | None, role: str,
                 environ: Mapping[str, str] = os.environ) -> Tracer | None:
    """This process's tracer for ``role`` (ingress, router, prefill, decode,
    colocated), or None: tracing is off, or configured only by the
    environment while OpenTelemetry is not installed (a warning)."""
    if isinstance(spec, dict):
        spec = TracingSpec.model_validate(spec)
    settings = export_settings(spec, environ)
    if settings is None:
        return None
    try:
        from splitserve.cluster.observability.otel import OtelTracer
    except ImportError as e:
        if spec is not None:
            raise TracingUnavailableError(
                f"observability.tracing is configured but OpenTelemetry is missing ({e.name}): "
                f"{INSTALL_HINT}") from None
        log.warning("$%s is set but OpenTelemetry is missing (%s): not tracing; %s",
                    next(k for k in ENDPOINT_ENVS if environ.get(k)), e.name, INSTALL_HINT)
        return None
    return OtelTracer(settings, role)


def check_installed(spec: TracingSpec | None) -> None:
    """Raise TracingUnavailableError when ``spec`` is set but OpenTelemetry's
    exporter is not installed here: ``splitserve deploy`` says so before it
    starts replicas that would refuse to start. Imports nothing."""
    import importlib.util

    if spec is None:
        return
    for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            raise TracingUnavailableError(
                f"observability.tracing is configured but {name} is not installed: "
                f"{INSTALL_HINT} (on every node)")


# -- the ingress request's span ------------------------------------------------------
_INGRESS: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "splitserve_ingress_span", default=None)


def ingress_span() -> Span | None:
    """The span of the client request this task serves (None: untraced)."""
    return _INGRESS.get()


def set_ingress_span(span: Span | None) -> contextvars.Token:
    return _INGRESS.set(span)


def reset_ingress_span(token: contextvars.Token) -> None:
    _INGRESS.reset(token)
