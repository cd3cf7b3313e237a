"""A request's scheduling options as the client APIs carry them
(``splitserve.cluster.api.backend.RequestOptions``).

- priority: the OpenAI body's ``priority`` (vLLM's field: lower is served
  first, default 0) or ``GenerateRequest.priority`` over gRPC; it orders
  the request in its model's router queue, never a request already running.
- timeout: HTTP's ``x-request-timeout`` header (seconds, > 0, up to
  ``MAX_TIMEOUT_S``), or the gRPC call's deadline; counted from when the
  ingress received the request. The request waits for a replica at most
  that long (and at most ``router.max_queue_delay_s``: 429 with
  Retry-After past it, as for the router's own bound), and a stream still
  running when it passes is cancelled (504, DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import math
import re

from splitserve.cluster.api.backend import RequestOptions
from splitserve.cluster.api.openai_schema import ApiError

TIMEOUT_HEADER = "x-request-timeout"
_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # ASCII decimal
MAX_TIMEOUT_S = 86400.0
PRIORITY_BOUND = 2**31 - 1  # gRPC's int32; the same bound over HTTP


def http_options(headers, priority: int | None, arrival: float) -> RequestOptions:
    """From the request's headers and body ``priority``; ``arrival``:
    wall-clock seconds it was received. Raises ApiError 400."""
    if priority is not None and abs(priority) > PRIORITY_BOUND:
        raise ApiError(400, f"priority must be within [-{PRIORITY_BOUND}, {PRIORITY_BOUND}]",
                       param="priority", code="invalid_value")
    raw = headers.get(TIMEOUT_HEADER)
    deadline = None
    if raw is not None:
        # float() would also read "1_0", other scripts' digits and "infinity"
        timeout_s = float(raw) if _SECONDS.fullmatch(raw) else math.nan
        if not (0 < timeout_s <= MAX_TIMEOUT_S):
            raise ApiError(400, f"{TIMEOUT_HEADER} must be a number of seconds in "
                           f"(0, {MAX_TIMEOUT_S:g}], got {raw[:40]!r}", param=TIMEOUT_HEADER,
                           code="invalid_value")
        deadline = arrival + timeout_s
    return RequestOptions(priority=priority or 0, deadline=deadline)


def grpc_options(priority: int, time_remaining: float | None, now: float) -> RequestOptions:
    """From ``GenerateRequest.priority`` and the call's remaining time
    (``context.time_remaining()``: None without a deadline)."""
    return RequestOptions(priority=priority,
                          deadline=None if time_remaining is None else now + time_remaining)
