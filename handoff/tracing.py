"""The tracing seam: what a process calls to record a request's phases as
spans of one distributed trace.

A request's trace context crosses processes as a W3C ``traceparent``
string in the typed messages (``GenerateRequest.traceparent``,
``PrefillRequest.traceparent``, ``splitserve.router.exchange.RouteCall``);
each process starts its spans as children of the one it was given. The
implementation over OpenTelemetry is
``splitserve.cluster.observability.otel.OtelTracer``, built by
``splitserve.cluster.observability.tracing.start_tracer``; with tracing off a
component holds ``None`` instead of a ``Tracer`` and checks only that, so
nothing imports OpenTelemetry.

Spans of one disaggregated request, by process (children indented):

  ingress           ingress   the HTTP or gRPC request (``SPAN_INGRESS``)
    route           ingress   one placement attempt, queue wait included
      router.queue  router    waiting in the model's queue (only if queued)
      router.place  router    the placement decision
    decode          decode    the Generate call: first token, end
      handoff.receive decode  reserve -> Prefill call -> commit
        prefill     prefill   the Prefill call on the prefill replica
          handoff.send prefill  the KV chunks, first send to last ack
"""

from __future__ import annotations

from typing import Any, Protocol

# span names
SPAN_INGRESS = "ingress"
SPAN_ROUTE = "route"
SPAN_ROUTER_QUEUE = "router.queue"
SPAN_ROUTER_PLACE = "router.place"
SPAN_DECODE = "decode"
SPAN_HANDOFF_RECEIVE = "handoff.receive"
SPAN_PREFILL = "prefill"
SPAN_HANDOFF_SEND = "handoff.send"

# span attributes (OpenTelemetry's gen_ai names where one exists)
ATTR_MODEL = "gen_ai.request.model"
ATTR_PROMPT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_FINISH_REASON = "gen_ai.response.finish_reasons"
ATTR_REQUEST_ID = "splitserve.request_id"
ATTR_REPLICA = "splitserve.replica_id"  # the replica the span ran on
ATTR_PREFILL_REPLICA = "splitserve.prefill_replica"
ATTR_DECODE_REPLICA = "splitserve.decode_replica"
ATTR_TRANSPORT = "splitserve.transport"
ATTR_BYTES = "splitserve.kv_bytes"
ATTR_CACHED_TOKENS = "splitserve.cached_tokens"
ATTR_PREFILL_MODE = "splitserve.prefill_mode"

# the longest traceparent a message carries: version 00 is 55 characters,
# later versions may append fields
MAX_TRACEPARENT_CHARS = 256


class Span(Protocol):
    """One phase of a request, started by ``Tracer.start``."""

    @property
    def traceparent(self) -> str:
        """This span's context as a W3C traceparent, for the next process."""

    def set(self, key: str, value: Any) -> None:
        """Set an attribute (str, bool, int, float or a list of one of them)."""

    def add(self, key: str, amount: int) -> None:
        """Add to an integer attribute (from 0), e.g. output tokens over n choices."""

    def event(self, name: str, **attributes: Any) -> None:
        """Mark a moment, e.g. the first token."""

    def fail(self, error: BaseException | str) -> None:
        """Mark the span failed: an exception is recorded on it, a string
        (e.g. "HTTP 503") only describes the failure."""

    def end(self, end_ns: int | None = None) -> None:
        """End the span (idempotent); ``end_ns``: time.time_ns() of its end."""


class Tracer(Protocol):
    """Starts spans; one per process (or per replica)."""

    def start(self, name: str, parent: str | None, *, server: bool = False,
              attributes: dict[str, Any] | None = None,
              start_ns: int | None = None) -> Span:
        """A span named ``name``, child of the W3C traceparent ``parent``
        (None or malformed: a new trace); ``server``: it serves a call from
        another process; ``start_ns``: time.time_ns() of its start (default
        now)."""

    def shutdown(self) -> None:
        """Export every span ended so far, then stop."""
