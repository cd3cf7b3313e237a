"""The workers' control plane: msgpack messages over gRPC.

Prefill and decode workers serve methods of one generic gRPC service
(``splitserve.Worker``); requests and replies are msgpack maps, so internal
messages need no codegen. Every call carries the cluster token as metadata
and is refused with UNAUTHENTICATED without it. Server-side exceptions map
to status codes; the client maps them back to ``RpcError`` with the code and,
for bad requests, the offending parameter.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import msgpack

from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import IncompatibleKVError, InvalidRequestError, OutOfBlocksError
from splitserve.handoff.transfer import errors as terr

SERVICE = "splitserve.Worker"
TOKEN_KEY = "x-splitserve-token"
MAX_MESSAGE_BYTES = 64 << 20

_pack = msgpack.packb
_unpack = lambda b: msgpack.unpackb(b, raw=False, strict_map_key=False)  # noqa: E731

# exception type -> status code, most specific first
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfBlocksError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IncompatibleKVError, grpc.StatusCode.FAILED_PRECONDITION),
    (terr.UnknownHandoffError, grpc.StatusCode.NOT_FOUND),
    (terr.TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (terr.MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (terr.TransferAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (terr.TransferError, grpc.StatusCode.UNAVAILABLE),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.param = param


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, RpcError):
        return exc.code
    for typ, code in _CODES:
        if isinstance(exc, typ):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context, exc: BaseException):
    details = json.dumps({"message": getattr(exc, "message", None) or str(exc),
                          "param": getattr(exc, "param", None)})
    await context.abort(status_for(exc), details)


def _authorized(context, token: str) -> bool:
    return secret_matches(dict(context.invocation_metadata()).get(TOKEN_KEY), token)


UnaryFn = Callable[[dict], Awaitable[dict]]
StreamFn = Callable[[dict], AsyncIterator[dict]]


def _unary_handler(fn: UnaryFn, token: str):
    async def handle(req, context):
        if not _authorized(context, token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
        try:
            return await fn(req)
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            await _abort(context, e)
    return grpc.unary_unary_rpc_method_handler(handle, _unpack, _pack)


def _stream_handler(fn: StreamFn, token: str):
    async def handle(req, context):
        if not _authorized(context, token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
        try:
            async for item in fn(req):
                yield item
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
    return grpc.unary_stream_rpc_method_handler(handle, _unpack, _pack)


async def serve(unary: dict[str, UnaryFn], streams: dict[str, StreamFn], token: str,
                host: str = "127.0.0.1", port: int = 0,
                tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server for these methods. Returns (server, "host:port")."""
    handlers = {name: _unary_handler(fn, token) for name, fn in unary.items()}
    handlers.update({name: _stream_handler(fn, token) for name, fn in streams.items()})
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    addr = f"{host}:{port}"
    if tls:
        bound = server.add_secure_port(addr, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(addr)
    await server.start()
    return server, f"{host}:{bound}"


def _decode_error(e: grpc.aio.AioRpcError) -> RpcError:
    msg, param = e.details() or "", None
    try:
        d = json.loads(msg)
        msg, param = d.get("message") or msg, d.get("param")
    except (ValueError, TypeError, AttributeError):
        pass
    return RpcError(e.code(), msg, param)


class WorkerClient:
    """A channel to one worker; safe to share within one event loop."""

    def __init__(self, address: str, token: str, root_certs: bytes | None = None):
        self.address = address
        self._md = ((TOKEN_KEY, token),)
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if root_certs:
            self._channel = grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials(root_certs), options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=opts)

    async def call(self, method: str, req: dict[str, Any], timeout: float | None = None) -> dict:
        fn = self._channel.unary_unary(f"/{SERVICE}/{method}", _pack, _unpack)
        try:
            return await fn(req, timeout=timeout, metadata=self._md)
        except grpc.aio.AioRpcError as e:
            raise _decode_error(e) from None

    async def stream(self, method: str, req: dict[str, Any],
                     timeout: float | None = None) -> AsyncIterator[dict]:
        """Iterate a server stream; leaving the loop early cancels the call."""
        fn = self._channel.unary_stream(f"/{SERVICE}/{method}", _pack, _unpack)
        call = fn(req, timeout=timeout, metadata=self._md)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as e:
            raise _decode_error(e) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()


class WorkerClients:
    """One ``WorkerClient`` per address, made on first use; shared within
    one event loop."""

    def __init__(self, token: str):
        self.token = token
        self._clients: dict[str, WorkerClient] = {}

    def get(self, address: str) -> WorkerClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = WorkerClient(address, self.token)
        return c

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
