"""The router's spans of the calls it places (``observability.tracing``).

A call that carries a traceparent (``RouteCall.traceparent``) gets a
``router.place`` span for its outcome (placement or refusal) and, when it
waited in the queue, a ``router.queue`` span from the exchange that queued
it to the poll that delivers it (or to the release that ended its wait:
its caller gave up). The router actor owns one ``RouterSpans`` per tracer.
"""

from __future__ import annotations

import time
from typing import Any

from splitserve.router.exchange import Exchange, ExchangeReply, Outcome, Queued, RouteCall

MAX_TRACED_WAITING = 1 << 16  # queued traced calls remembered; past it the oldest are dropped


class RouterSpans:
    def __init__(self, tracer: Any, router_index: int):
        """``tracer``: what ``start_tracer`` returned (not None)."""
        self.tracer = tracer
        self.router_index = router_index
        # traced calls waiting in a queue: lease id -> (the call, time.time_ns() queued)
        self._waiting: dict[str, tuple[RouteCall, int]] = {}

    def exchange(self, ex: Exchange, reply: ExchangeReply) -> None:
        """Spans of an exchange's outcomes; remember the traced calls it queued."""
        waiting = self._waiting
        for end in ex.releases:  # ended while it waited: the caller gave up
            entry = waiting.pop(end.lease_id, None)
            if entry is not None:
                self._queue_span(*entry, cancelled=True)
        for call, out in zip(ex.calls, reply.outcomes):
            if call.traceparent is None:
                continue
            if isinstance(out, Queued):
                waiting[call.lease_id] = (call, time.time_ns())
                if len(waiting) > MAX_TRACED_WAITING:
                    del waiting[next(iter(waiting))]
            else:
                self._outcome(call, 0, out)

    def resolved(self, outcomes: list[tuple[str, Outcome]]) -> None:
        """Spans of queued calls a poll delivers."""
        if not self._waiting:
            return
        for lease_id, out in outcomes:
            waiting = self._waiting.pop(lease_id, None)
            if waiting is not None:
                self._outcome(*waiting, out)

    def _queue_span(self, call: RouteCall, queued_ns: int, cancelled: bool = False) -> None:
        """Record the ``router.queue`` span of a call queued at ``queued_ns``,
        ended now (``cancelled``: its caller gave up)."""
        from splitserve.handoff.tracing import ATTR_MODEL, ATTR_REQUEST_ID, SPAN_ROUTER_QUEUE

        span = self.tracer.start(SPAN_ROUTER_QUEUE, call.traceparent, start_ns=queued_ns,
                                 attributes={ATTR_MODEL: call.request.model,
                                             ATTR_REQUEST_ID: call.request.request_id})
        if cancelled:
            span.set("splitserve.cancelled", True)
        span.end()

    def _outcome(self, call: RouteCall, queued_ns: int, out: Outcome) -> None:
        """``router.place`` for ``call``'s outcome, after its ``router.queue``
        span if it waited (``queued_ns`` > 0)."""
        from splitserve.handoff.tracing import (ATTR_DECODE_REPLICA, ATTR_MODEL,
                                                ATTR_PREFILL_REPLICA, ATTR_REQUEST_ID,
                                                SPAN_ROUTER_PLACE)

        if queued_ns:
            self._queue_span(call, queued_ns)
        req = call.request
        span = self.tracer.start(SPAN_ROUTER_PLACE, call.traceparent, attributes={
            ATTR_MODEL: req.model, ATTR_REQUEST_ID: req.request_id,
            "splitserve.router": self.router_index, "splitserve.prompt_len": req.prompt_len,
            "splitserve.waited_s": max(0.0, time.time() - call.waiting_since)})
        if isinstance(out, Exception):  # a refusal
            span.fail(out)
        else:
            span.set(ATTR_PREFILL_REPLICA, out.prefill_replica or "")
            span.set(ATTR_DECODE_REPLICA, out.decode_replica)
            span.set("splitserve.placement_reason", out.reason)
            span.set("splitserve.predicted_ttft_s", out.predicted_ttft_s)
            span.set("splitserve.prefix_hit_tokens", out.prefix_hit_tokens)
        span.end()
