"""ASGI middleware: the ``ingress`` span of each generation request over HTTP.

A client's W3C ``traceparent`` header makes the span its child (and its
sampled flag decides); without one the span starts a trace. The span is the
task's ``ingress_span`` while the request runs (the body streamed
included), so ``ClusterBackend.generate`` adds the request's attributes and
passes its context on. A 5xx answer, or an exception that escapes, marks
the span failed; the status code is an attribute either way. Probes,
/metrics and the other routes are not traced.
"""

from __future__ import annotations

from starlette.datastructures import Headers

from splitserve.cluster.observability.tracing import (ingress_span, reset_ingress_span,
                                                      set_ingress_span)
from splitserve.handoff.tracing import SPAN_INGRESS, Tracer

EVENT_BODY_READ = "body_read"  # the request body is in: behind Serve's proxy, one more round trip


def mark(name: str) -> None:
    """An event on the current request's ``ingress`` span, if it is traced."""
    span = ingress_span()
    if span is not None:
        span.event(name)


TRACED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


class TracingMiddleware:
    def __init__(self, app, tracer: Tracer, paths: frozenset[str] = TRACED_PATHS):
        self.app = app
        self.tracer = tracer
        self.paths = paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        span = self.tracer.start(SPAN_INGRESS, Headers(scope=scope).get("traceparent"),
                                 server=True, attributes={
                                     "splitserve.api": "http",
                                     "http.request.method": scope["method"],
                                     "http.route": scope["path"]})
        status = 0

        async def send_traced(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = set_ingress_span(span)
        try:
            await self.app(scope, receive, send_traced)
        except BaseException as e:
            span.fail(e)
            span.set("http.response.status_code", status or 500)
            raise
        else:
            span.set("http.response.status_code", status)
            if status >= 500:
                span.fail(f"HTTP {status}")
        finally:
            reset_ingress_span(token)
            span.end()
