"""``splitserve.handoff.tracing.Tracer`` over the OpenTelemetry SDK, exporting
OTLP over gRPC. Imported only when tracing is on
(``splitserve.cluster.observability.tracing.start_tracer``).

Each tracer owns its ``TracerProvider`` and never installs it as the global
one, so nothing else in the process (Ray's own instrumentation, a user's)
is redirected or traced by it. Spans are started with an explicit parent
(the traceparent a message carried) rather than the current context, so
asyncio tasks and threads never hand a request's context to another.
Sampling follows the parent (a client's or the ingress's decision, carried
in the traceparent's flags) and, for a new trace, ``sample_ratio``. Ended
spans go out in batches every ``schedule_delay_ms``; ``shutdown`` exports
what is left.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from splitserve.cluster.observability.tracing import ExportSettings

_PROPAGATOR = TraceContextTextMapPropagator()
_STATUS_CHARS = 200


def _parent_context(traceparent: str | None) -> Context:
    """The context of a W3C traceparent; an empty one (a new trace) when it
    is None or malformed."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, context=Context())


class OtelSpan:
    """One OpenTelemetry span (``splitserve.handoff.tracing.Span``)."""

    __slots__ = ("_span", "_counts", "_ended")

    def __init__(self, span):
        self._span = span
        self._counts: dict[str, int] = {}
        self._ended = False

    @property
    def traceparent(self) -> str:
        c = self._span.get_span_context()
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    @property
    def recording(self) -> bool:
        """Whether this span is sampled (recorded and exported)."""
        return self._span.is_recording()

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def add(self, key: str, amount: int) -> None:
        total = self._counts[key] = self._counts.get(key, 0) + amount
        self._span.set_attribute(key, total)

    def event(self, name: str, **attributes: Any) -> None:
        self._span.add_event(name, {k: v for k, v in attributes.items() if v is not None})

    def fail(self, error: BaseException | str) -> None:
        if isinstance(error, str):
            kind, description = error, error
        else:
            self._span.record_exception(error)
            kind, description = type(error).__name__, f"{type(error).__name__}: {error}"
        self._span.set_attribute("error.type", kind)
        self._span.set_status(Status(StatusCode.ERROR, description[:_STATUS_CHARS]))

    def end(self, end_ns: int | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._span.end(end_time=end_ns)


def _credentials(s: ExportSettings) -> grpc.ChannelCredentials | None:
    if s.ca_file is None and s.client_cert_file is None:
        return None  # the exporter's default: the system's roots

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).expanduser().read_bytes()

    return grpc.ssl_channel_credentials(root_certificates=read(s.ca_file),
                                        private_key=read(s.client_key_file),
                                        certificate_chain=read(s.client_cert_file))


class OtelTracer:
    """A ``splitserve.handoff.tracing.Tracer`` exporting to ``settings.endpoint``.
    ``common``: attributes every span of this tracer gets (its replica id,
    its transport), filled in by the owner once known."""

    def __init__(self, settings: ExportSettings, role: str):
        host, pid = socket.gethostname(), os.getpid()
        resource = Resource.create({
            "service.name": settings.service_name,
            "service.instance.id": f"{host}:{pid}:{role}",
            "host.name": host,
            "process.pid": pid,
            "splitserve.role": role,
        })
        credentials = _credentials(settings)
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            insecure=False if credentials is not None else settings.insecure,
            credentials=credentials, headers=settings.headers or None,
            timeout=settings.timeout_s)
        self.settings = settings
        self.common: dict[str, Any] = {}
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, schedule_delay_millis=settings.schedule_delay_ms,
            export_timeout_millis=int(settings.timeout_s * 1000)))
        self._tracer = self._provider.get_tracer("splitserve")

    def start(self, name: str, parent: str | None, *, server: bool = False,
              attributes: dict[str, Any] | None = None,
              start_ns: int | None = None) -> OtelSpan:
        attrs = {**self.common, **attributes} if attributes else self.common
        span = self._tracer.start_span(
            name, context=_parent_context(parent),
            kind=SpanKind.SERVER if server else SpanKind.INTERNAL,
            attributes={k: v for k, v in attrs.items() if v is not None},
            start_time=start_ns)
        return OtelSpan(span)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Export every ended span now; whether it finished in time."""
        ms = int(1000 * (timeout_s if timeout_s is not None else self.settings.timeout_s))
        return self._provider.force_flush(ms)

    def shutdown(self) -> None:
        self.flush()
        self._provider.shutdown()
