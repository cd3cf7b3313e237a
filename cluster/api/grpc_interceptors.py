"""Interceptors of the gRPC API server: the API key on every method (the
health service optionally open), metadata bounded in size, a unary request
that never arrives whole answered INVALID_ARGUMENT (gRPC leaves that call
open without a status), and a request that does not parse as its message
answered INVALID_ARGUMENT instead of gRPC's own UNKNOWN. Their order is
``start_grpc_server``'s (splitserve.cluster.api.grpc_api)."""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError

from splitserve.cluster.api.health import HEALTH_METHOD_PREFIX
from splitserve.engine.auth import secret_matches

DETAILS_CHARS = 1024  # status details stay small whatever the request echoed
PARAM_METADATA = "splitserve-param"
MISSING_KEY = ("missing or invalid API key: send metadata 'authorization: Bearer <key>' or "
               "'x-api-key: <key>'")


def _key_problem(metadata, keys: list[bytes]) -> str | None:
    """Why the call's credentials are refused, or None: it needs one
    ``authorization: Bearer <key>`` and/or one ``x-api-key: <key>``, each
    naming a configured key. A name sent twice is refused whatever the values
    hold (as HTTP refuses two Authorization headers): taking either would let
    a proxy that checks the other one disagree with this check."""
    given: dict[str, list[str]] = {"authorization": [], "x-api-key": []}
    for key, value in metadata or ():
        if key in given:  # a -bin value is bytes: never a key
            given[key].append(value if isinstance(value, str) else "")
    for name, values in given.items():
        if len(values) > 1:
            return f"send one '{name}' metadata entry, not {len(values)}"
    if not given["authorization"] and not given["x-api-key"]:
        return MISSING_KEY
    ok = True
    for bearer in given["authorization"]:
        ok &= bearer[:7].lower() == "bearer "
        ok &= secret_matches(bearer[7:].strip(), *keys)
    for key in given["x-api-key"]:  # no early exit: the time taken does not tell which matched
        ok &= secret_matches(key.strip(), *keys)
    return None if ok else MISSING_KEY


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every method without a configured key; the health service too
    unless ``open_health``."""

    def __init__(self, api_keys: list[str], open_health: bool = False):
        self.keys = [k.encode() for k in api_keys]
        self.open_health = open_health

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        problem = None if handler is None else _key_problem(details.invocation_metadata, self.keys)
        if problem is None:
            return handler
        if self.open_health and details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler

        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, problem)


def refusal(handler, code: grpc.StatusCode, details: str):
    """A handler of ``handler``'s kind that answers ``code`` at once."""
    async def refuse(_request, context):
        await context.abort(code, details)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](refuse)


class MetadataLimitInterceptor(grpc.aio.ServerInterceptor):
    """A call whose metadata (names and values, all entries together) passes
    ``max_bytes`` is RESOURCE_EXHAUSTED. gRPC enforces its own limit
    (``grpc.absolute_max_metadata_size``) on some encodings of a header
    only: a raw HTTP/2 client's uncompressed literal passes it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        size = sum(len(k) + len(v) for k, v in details.invocation_metadata or ())
        if handler is None or size <= self.max_bytes:
            return handler
        return refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"the call's metadata has {size} bytes; at most {self.max_bytes}")


class OneRequestInterceptor(grpc.aio.ServerInterceptor):
    """A unary-request method whose request never arrives whole (the client
    half-closes with no message, or its length prefix promises more bytes
    than the stream carries) is INVALID_ARGUMENT. gRPC's own unary path
    drops such a call without a status, leaving the stream open until the
    connection closes; read as a request stream here, the missing message
    is seen and answered. Placed before ``DecodeErrorInterceptor``, whose
    handlers it wraps."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler

        async def one(requests, context):
            request = await anext(aiter(requests), None)
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "the call carried no complete request message",
                                    trailing_metadata=((PARAM_METADATA, ""),))
            return request

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream_stream(requests, context):
                responses = inner_stream(await one(requests, context), context)
                if not inspect.isasyncgen(responses):  # a refusal: a coroutine that aborts
                    await responses
                    return
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        inner_unary = handler.unary_unary

        async def stream_unary(requests, context):
            return await inner_unary(await one(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class _Undecodable:
    """What a request that does not parse as its message becomes."""

    def __init__(self, error: DecodeError):
        self.error = str(error)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """A request message that does not parse is INVALID_ARGUMENT (gRPC itself
    answers UNKNOWN, as for a server fault), on every unary-request method."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(data: bytes):
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(e)

        async def refuse(request: _Undecodable, context) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid message: {request.error}"[:DETAILS_CHARS],
                                trailing_metadata=((PARAM_METADATA, ""),))

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                responses = inner_stream(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:  # also when the client cancels: the generation is cancelled now
                    await responses.aclose()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=tolerant,
                response_serializer=handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=tolerant, response_serializer=handler.response_serializer)
