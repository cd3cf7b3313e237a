"""A response stream whose client stops reading ends after a bounded stall.

HTTP/2 flow control lets a client hold a stream open without reading it:
once its window is full, gRPC's write of the next response never completes,
and a handler that only yields would wait with it forever, holding the
request's admission slot and, in the engine, its sequence and KV blocks.
``WriteStallInterceptor`` writes each response of a server-streaming method
itself and gives a write ``write_stall_s``: one that takes longer closes the
method's response generator (the backend stream is closed, the generation
cancelled, its blocks freed) and ends the call with ``DEADLINE_EXCEEDED``.
``WRITE_STALL_S`` is the HTTP server's bound too
(splitserve.cluster.api.http_server.WRITE_STALL_S).
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc

log = logging.getLogger("splitserve.grpc")

WRITE_STALL_S = 60.0  # the HTTP server's: one response the client does not take for this long


class WriteStallInterceptor(grpc.aio.ServerInterceptor):
    """Bounds each response write of every server-streaming method (Generate,
    health Watch) to ``write_stall_s`` seconds; must come first among the
    server's interceptors, so that it wraps what the others return."""

    def __init__(self, write_stall_s: float = WRITE_STALL_S):
        if not write_stall_s > 0:
            raise ValueError(f"write_stall_s must be positive, got {write_stall_s!r}")
        self.write_stall_s = write_stall_s

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not handler.response_streaming:
            return handler
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        if not inspect.isasyncgenfunction(inner):
            return handler  # e.g. a refusal, which writes no response
        stall_s = self.write_stall_s
        method = details.method

        async def write_all(request, context) -> None:
            responses = inner(request, context)
            stalled = False
            try:
                async for response in responses:
                    try:
                        await asyncio.wait_for(context.write(response), stall_s)
                    except asyncio.TimeoutError:
                        stalled = True
                        break
            finally:
                # frees what the stream holds before anything else is awaited; shielded:
                # a client that disconnects meanwhile cancels this task, and an
                # interrupted close would leave the request running
                await asyncio.shield(responses.aclose())
            if stalled:
                log.warning("%s: the client read nothing for %g s; the call is ended", method, stall_s)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"the client read no response for {stall_s:g} s")

        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(write_all, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
