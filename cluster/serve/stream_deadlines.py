"""Deadlines on one request's decode streams, as the ingress reads them.

A request gets one overall deadline when it starts (``DeadlineSpec.overall_s``
of the tokens it may produce, or the client's own deadline if that comes
first); every Generate call it makes, the first and
any resume, carries what is left of it as its gRPC deadline, which the
decode replica (and, through its own call, the prefill replica) sees as a
cancellation. While a stream runs, each output must arrive within
``first_output_s`` (the first of that call) or ``inter_token_s`` (the
next). Whichever passes first, the stream is closed, which cancels the
call on the workers (they abort the request and free its KV), and
``DeadlineExceeded`` is raised.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable, TypeVar

from splitserve.cluster.api.backend import DeadlineExceeded
from splitserve.cluster.config import DeadlineSpec

T = TypeVar("T")


class StreamDeadlines:
    def __init__(self, spec: DeadlineSpec, request_id: str, max_output_tokens: int,
                 clock: Callable[[], float] = time.monotonic, deadline: float | None = None):
        """``deadline``: the client's own, wall-clock seconds (``time.time()``)."""
        self.spec = spec
        self.request_id = request_id
        self.clock = clock
        self.overall_s = spec.overall_s(max(1, max_output_tokens))
        self.own = deadline is not None and deadline - time.time() < self.overall_s
        if self.own:
            self.overall_s = max(0.0, deadline - time.time())
        self.ends_at = clock() + self.overall_s

    def remaining(self) -> float:
        """Seconds left of the overall deadline (never below a millisecond,
        so a gRPC deadline derived from it is always a deadline)."""
        return max(0.001, self.ends_at - self.clock())

    def expired(self, replica: str) -> DeadlineExceeded:
        why = ("the client's timeout" if self.own
               else "deadlines.per_token_s, max_request_s")
        return DeadlineExceeded(
            f"request {self.request_id}: the overall deadline of {self.overall_s:.1f}s passed "
            f"while streaming from {replica} ({why}); cancelled")

    async def outputs(self, stream: AsyncIterator[T], replica: str) -> AsyncIterator[T]:
        """``stream``'s items, each within its deadline; closes ``stream``
        on the way out, whatever the way."""
        first = True
        try:
            while True:
                wait = self.spec.first_output_s if first else self.spec.inter_token_s
                limit = min(wait, self.ends_at - self.clock())
                timer = asyncio.timeout(max(0.0, limit))
                try:
                    async with timer:
                        item = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not timer.expired():  # the stream's own error
                        raise
                    if limit < wait:
                        raise self.expired(replica) from None
                    what = ("its first token within deadlines.first_output_s" if first
                            else "its next token within deadlines.inter_token_s")
                    raise DeadlineExceeded(
                        f"request {self.request_id}: decode replica {replica} produced no "
                        f"output for {wait:g}s, waiting for {what}; cancelled") from None
                first = False
                yield item
        finally:
            await stream.aclose()
