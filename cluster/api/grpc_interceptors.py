"""Interceptors of the gRPC API server: the API key on every method (the
health service optionally open), and a request that does not parse as its
message answered INVALID_ARGUMENT instead of gRPC's own UNKNOWN."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from splitserve.cluster.api.health import HEALTH_METHOD_PREFIX
from splitserve.engine.auth import secret_matches

DETAILS_CHARS = 1024  # status details stay small whatever the request echoed
PARAM_METADATA = "splitserve-param"


def _key_ok(metadata, keys: list[bytes]) -> bool:
    given = []
    for key, value in metadata or ():
        if key == "authorization" and value[:7].lower() == "bearer ":
            given.append(value[7:].strip())
        elif key == "x-api-key":
            given.append(value.strip())
    ok = False
    for g in given:  # no early exit: the time taken does not tell which value was a key
        ok |= secret_matches(g, *keys)
    return ok


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every method without a configured key; the health service too
    unless ``open_health``."""

    def __init__(self, api_keys: list[str], open_health: bool = False):
        self.keys = [k.encode() for k in api_keys]
        self.open_health = open_health

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or _key_ok(details.invocation_metadata, self.keys):
            return handler
        if self.open_health and details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler

        async def deny(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key: send metadata 'authorization: Bearer "
                                "<key>' or 'x-api-key: <key>'")

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return make[(handler.request_streaming, handler.response_streaming)](deny)


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
