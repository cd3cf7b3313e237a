"""Generation over HTTP, shared by the OpenAI endpoints (completions, chat,
Responses): backend exceptions as HTTP errors, a request's backend streams
read concurrently with a watch on the client's connection, and the SSE
response that closes those streams however it ends."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse

from splitserve.cluster.api.adapter_registry import AdapterConflict, UnknownAdapter
from splitserve.cluster.api.backend import DeadlineExceeded, Overloaded, Unavailable, UnknownModel
from splitserve.cluster.api.openai_schema import ApiError
from splitserve.engine.errors import AdapterUnavailableError, InvalidRequestError, SplitserveError
from splitserve.engine.hashing import splitmix64
from splitserve.engine.sampling_params import SamplingParams

log = logging.getLogger("splitserve.http")

TIMINGS_HEADER = "x-splitserve-timings"  # a request header asking for the phase breakdown
# The response header carrying the answer's id (its body's "id"). Not x-request-id:
# Ray Serve's proxy adds its own x-request-id to every response (the client's, or
# a UUID) and cannot be told not to, so a second one would make two.
REQUEST_ID_HEADER = "x-splitserve-request-id"


def api_error(e: BaseException) -> ApiError:
    """The HTTP error a backend or validation exception stands for."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e), param=e.param, code="invalid_value")
    if isinstance(e, UnknownModel):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), param="lora_name", code="adapter_not_found")
    if isinstance(e, AdapterConflict):
        return ApiError(409, str(e), param="lora_name", code="adapter_exists")
    if isinstance(e, AdapterUnavailableError):  # this server cannot read the adapter now
        return ApiError(503, str(e), "service_unavailable", code="adapter_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), "rate_limit_error", code="overloaded",
                        headers={"Retry-After": _retry_after(e.retry_after_s)})
    if isinstance(e, Unavailable):
        return ApiError(503, str(e), "service_unavailable", code="unavailable",
                        headers={"Retry-After": _retry_after(e.retry_after_s)})
    if isinstance(e, DeadlineExceeded):
        return ApiError(504, str(e), "timeout_error", code="deadline_exceeded")
    if isinstance(e, SplitserveError):  # a server-side fault with a useful message
        return ApiError(500, str(e), "server_error", code="internal_error")
    log.exception("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error")


class ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


_END = object()


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index`` of an n-choice request runs as its own backend
    request. Seeded siblings must differ yet stay reproducible, so choice
    i > 0 samples with a seed derived from (seed, i); choice 0 keeps the seed
    and equals the n=1 request."""
    seed = params.seed
    if seed is not None and index > 0:
        seed = splitmix64(seed ^ splitmix64(index)) >> 1  # in [0, 2**63)
    return dataclasses.replace(params, n=1, seed=seed)


class Choices:
    """A request's backend streams (one per choice) read concurrently, and a
    watch on the client's connection. ``next_or_none()`` returns (choice
    index, output) as outputs arrive and re-raises a stream's error;
    ``aclose()`` cancels what still runs, which closes those backend streams
    (cancelling their requests and freeing their KV blocks)."""

    def __init__(self, streams: list[AsyncIterator[dict]], receive):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        self._tasks.append(asyncio.create_task(self._watch(receive)))

    async def _pump(self, index: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, _END))
        except Exception as e:  # noqa: BLE001 - delivered to the reader
            self._queue.put_nowait((index, e))
        finally:
            await stream.aclose()

    async def _watch(self, receive) -> None:
        # The body has been read: the next message is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._queue.put_nowait((-1, ClientGone("the client disconnected")))

    async def next_or_none(self) -> tuple[int, dict] | None:
        while self._open:
            index, item = await self._queue.get()
            if item is _END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return index, item
        return None

    async def next(self) -> tuple[int, dict]:
        item = await self.next_or_none()
        if item is None:
            raise Unavailable("the backend ended the request without any output")
        return item

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def sse_data(obj: Any, event: str | None = None) -> bytes:
    """One SSE message whose data is ``obj`` as JSON (named ``event`` if given)."""
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + data.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """SSE whose backend streams are closed however the response ends,
    including when it never starts (the client left before the headers)."""

    def __init__(self, choices: Choices, content: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._choices.aclose()


async def open_choices(request, streams: list[AsyncIterator[dict]]
                       ) -> tuple[Choices, tuple[int, dict]] | None:
    """The request's choices and their first output, awaited so that a
    refusal (overload, an unknown model) raises here and becomes an HTTP
    status rather than a broken stream; None when the client left first."""
    choices = Choices(streams, request.receive)
    try:
        return choices, await choices.next()
    except BaseException as e:
        await choices.aclose()
        if isinstance(e, ClientGone):
            return None
        raise
