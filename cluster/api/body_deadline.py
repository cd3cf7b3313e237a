"""A deadline on receiving an HTTP request's body
(``endpoints.body_timeout_s``).

A client that announces ``Content-Length: 1000`` and sends 10 bytes, or a
chunked body that stops, would otherwise hold its connection and the
request's task until it gives up. ``BodyDeadline`` wraps the ASGI
``receive`` of every HTTP request: until the last body message
(``more_body`` false) has arrived, each ``receive`` waits at most what is
left of ``timeout_s``, counted from when the request reached the app; past
it, ``receive`` raises ``ApiError`` 408 (``code: request_timeout``) with
``Connection: close``, which the app's error handler answers in OpenAI's
shape, and the server closes the connection after it (the unread rest of
the body is never read). Once the body is in, ``receive`` is passed through
unbounded: it then only waits for the client's disconnect while a response
streams. The same app runs behind Serve's proxy and under the ingress
replicas' own uvicorn (``splitserve.cluster.api.http_server``), so both
modes get the bound.
"""

from __future__ import annotations

import asyncio

from splitserve.cluster.api.openai_schema import ApiError


def body_timeout_error(timeout_s: float) -> ApiError:
    """The 408 answer to a body that did not arrive within ``timeout_s``."""
    return ApiError(408, f"the request body did not arrive within {timeout_s:g} s "
                    "(endpoints.body_timeout_s)", code="request_timeout",
                    headers={"Connection": "close"})


class BodyDeadline:
    """ASGI middleware: an HTTP request's body must arrive within
    ``timeout_s`` seconds of the request reaching the app."""

    def __init__(self, app, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def bounded_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise body_timeout_error(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True  # the whole body, or the client is gone
            return message

        await self.app(scope, bounded_receive, send)
