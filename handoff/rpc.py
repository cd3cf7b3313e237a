"""The workers' control plane: typed msgpack messages over gRPC.

Prefill and decode workers serve methods of one generic gRPC service
(``splitserve.Worker``). Each method's request and reply types are in
``splitserve.handoff.messages`` (``METHODS``); bodies are msgpack, decoded
strictly into those types on receipt, so internal messages need no codegen
and a malformed one fails loudly (INVALID_ARGUMENT). Every call carries the
cluster token as metadata and is refused with UNAUTHENTICATED without it.
A failure crosses as a typed ``WorkerError`` and is raised on the client as
the worker's own exception class (``splitserve.handoff.rpc_errors``).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import msgspec

from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import InvalidRequestError
from splitserve.handoff import rpc_errors
from splitserve.handoff.messages import (GENERATE, METHODS, PREFILL, STATS, GenerateOutput,
                                         GenerateRequest, Method, PrefillReply, PrefillRequest)
from splitserve.handoff.rpc_errors import RpcError

SERVICE = "splitserve.Worker"
TOKEN_KEY = "x-splitserve-token"
MAX_MESSAGE_BYTES = 64 << 20

_encode = msgspec.msgpack.encode
_REQUESTS = {m.name: msgspec.msgpack.Decoder(m.request).decode for m in METHODS.values()}
_REPLIES = {m.name: msgspec.msgpack.Decoder(m.reply).decode for m in METHODS.values()}

__all__ = ["RpcError", "SERVICE", "WorkerClient", "WorkerClients", "serve"]


def _method(name: str | Method) -> Method:
    m = METHODS.get(name if isinstance(name, str) else name.name)
    if m is None:
        raise ValueError(f"unknown worker method {name!r}; known: {sorted(METHODS)}")
    return m


def _decode_request(m: Method, raw: bytes) -> Any:
    try:
        return _REQUESTS[m.name](raw)
    except msgspec.DecodeError as e:
        raise InvalidRequestError(f"malformed {m.name} request: {e}") from None


async def _abort(context, exc: BaseException):
    code, err = rpc_errors.worker_error(exc)
    await context.abort(code, rpc_errors.details(err))


def _authorized(context, token: str) -> bool:
    return secret_matches(dict(context.invocation_metadata()).get(TOKEN_KEY), token)


UnaryFn = Callable[[Any], Awaitable[Any]]  # typed request -> typed reply
StreamFn = Callable[[Any], AsyncIterator[Any]]


async def _refuse(context) -> None:
    await context.abort(*rpc_errors.unauthenticated())


def _unary_handler(m: Method, fn: UnaryFn, token: str):
    async def handle(raw: bytes, context) -> bytes:
        if not _authorized(context, token):
            await _refuse(context)
        try:
            return _encode(await fn(_decode_request(m, raw)))
        except Exception as e:  # noqa: BLE001 - sent as a typed error
            await _abort(context, e)
    return grpc.unary_unary_rpc_method_handler(handle)


def _stream_handler(m: Method, fn: StreamFn, token: str):
    async def handle(raw: bytes, context):
        if not _authorized(context, token):
            await _refuse(context)
        try:
            async for item in fn(_decode_request(m, raw)):
                yield _encode(item)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
    return grpc.unary_stream_rpc_method_handler(handle)


async def serve(unary: dict[str, UnaryFn], streams: dict[str, StreamFn], token: str,
                host: str = "127.0.0.1", port: int = 0,
                tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server for these methods (by name, from
    ``messages.METHODS``; each function takes that method's request type).
    Returns (server, "host:port")."""
    handlers = {}
    for name, fn in unary.items():
        m = _method(name)
        if m.streaming:
            raise ValueError(f"{name} is a streaming method")
        handlers[name] = _unary_handler(m, fn, token)
    for name, fn in streams.items():
        m = _method(name)
        if not m.streaming:
            raise ValueError(f"{name} is not a streaming method")
        handlers[name] = _stream_handler(m, fn, token)
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


def _request(m: Method, req: Any) -> Any:
    """``req`` as ``m``'s request type: converted strictly when given as a dict."""
    return req if isinstance(req, m.request) else msgspec.convert(req, m.request)


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

    async def call(self, method: str | Method, req: Any, timeout: float | None = None) -> Any:
        """One unary call. Returns the method's reply type; raises RpcError
        (as the worker's exception class where it answered with one)."""
        m = _method(method)
        fn = self._channel.unary_unary(f"/{SERVICE}/{m.name}")
        try:
            raw = await fn(_encode(_request(m, req)), timeout=timeout, metadata=self._md)
        except grpc.aio.AioRpcError as e:
            raise rpc_errors.client_error(e.code(), e.details()) from None
        return _REPLIES[m.name](raw)

    async def stream(self, method: str | Method, req: Any,
                     timeout: float | None = None) -> AsyncIterator[Any]:
        """Iterate a server stream; leaving the loop early cancels the call."""
        m = _method(method)
        fn = self._channel.unary_stream(f"/{SERVICE}/{m.name}")
        call = fn(_encode(_request(m, req)), timeout=timeout, metadata=self._md)
        decode = _REPLIES[m.name]
        try:
            async for raw in call:
                yield decode(raw)
        except grpc.aio.AioRpcError as e:
            raise rpc_errors.client_error(e.code(), e.details()) from None
        finally:
            call.cancel()

    async def prefill(self, req: PrefillRequest, timeout: float | None = None) -> PrefillReply:
        return await self.call(PREFILL, req, timeout)

    def generate(self, req: GenerateRequest,
                 timeout: float | None = None) -> AsyncIterator[GenerateOutput]:
        return self.stream(GENERATE, req, timeout)

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.call(STATS, {}, timeout)

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
