"""The workers' control plane: typed msgpack messages over gRPC.

Prefill and decode workers serve methods of one generic gRPC service
(``splitserve.Worker``). Each method's request and reply types are in
``splitserve.handoff.messages`` (``METHODS``); bodies are msgpack, decoded
strictly into those types on receipt, so internal messages need no codegen
and a malformed one fails loudly (INVALID_ARGUMENT). A failure crosses as a
typed ``WorkerError`` and is raised on the client as the worker's own
exception class (``splitserve.handoff.rpc_errors``).

What a server does with a call, in order:
  1. the cluster token (metadata) is checked as the call starts: without it
     the call is refused UNAUTHENTICATED and its body is never read;
  2. gRPC refuses a message over the largest bound of the methods served
     (RESOURCE_EXHAUSTED);
  3. the method's own bound (``Method.max_request_bytes``) is checked on the
     raw bytes (RESOURCE_EXHAUSTED);
  4. the body is decoded into the method's request type, with the length
     bounds of ``splitserve.handoff.messages`` (INVALID_ARGUMENT);
  5. the method runs.
TLS (and mutual TLS) when given a ``splitserve.handoff.tls.TLSConfig``.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import msgspec

from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import InvalidRequestError
from splitserve.handoff import rpc_errors
from splitserve.handoff import tls as tls_
from splitserve.handoff.messages import (GENERATE, METHODS, PREFILL, STATS, GenerateOutput,
                                         GenerateRequest, Method, PrefillReply, PrefillRequest)
from splitserve.handoff.rpc_errors import RpcError
from splitserve.handoff.tls import TLSConfig
from splitserve.handoff.transfer.errors import MessageTooLarge

SERVICE = "splitserve.Worker"
TOKEN_KEY = "x-splitserve-token"
# replies come from workers that passed the TLS and token checks: a long
# prompt's prompt_logprobs may be large, and a hybrid model's recurrent states
# ride in a prefill reply (up to messages.MAX_STATE_BYTES)
MAX_REPLY_BYTES = 256 << 20

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
    if len(raw) > m.max_request_bytes:
        raise MessageTooLarge(f"a {m.name} request of {len(raw)} bytes; at most "
                              f"{m.max_request_bytes}")
    try:
        return _REQUESTS[m.name](raw)
    except msgspec.DecodeError as e:
        raise InvalidRequestError(f"malformed {m.name} request: {e}") from None


async def _abort(context, exc: BaseException):
    code, err = rpc_errors.worker_error(exc)
    await context.abort(code, rpc_errors.details(err))


async def _deny(_requests, context) -> None:
    # takes the request stream and never reads it: nothing of the body is decoded
    await context.abort(*rpc_errors.unauthenticated())


# request-streaming whatever the method, so gRPC hands it the body unread
_DENY = grpc.stream_unary_rpc_method_handler(_deny)


class _TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every call without the cluster token as it starts (after its
    headers, before its body)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the worker RPC plane needs the cluster token; got an empty one")
        self._token = token

    async def intercept_service(self, continuation, details):
        md = details.invocation_metadata or ()
        given = next((v for k, v in md if k == TOKEN_KEY), None)
        if secret_matches(given, self._token):
            return await continuation(details)
        return _DENY


UnaryFn = Callable[[Any], Awaitable[Any]]  # typed request -> typed reply
StreamFn = Callable[[Any], AsyncIterator[Any]]


def _unary_handler(m: Method, fn: UnaryFn):
    async def handle(raw: bytes, context) -> bytes:
        try:
            return _encode(await fn(_decode_request(m, raw)))
        except Exception as e:  # noqa: BLE001 - sent as a typed error
            await _abort(context, e)
    return grpc.unary_unary_rpc_method_handler(handle)


def _stream_handler(m: Method, fn: StreamFn):
    async def handle(raw: bytes, context):
        try:
            async for item in fn(_decode_request(m, raw)):
                yield _encode(item)
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
    return grpc.unary_stream_rpc_method_handler(handle)


async def serve(unary: dict[str, UnaryFn], streams: dict[str, StreamFn], token: str,
                host: str = "127.0.0.1", port: int = 0,
                tls: TLSConfig | None = None) -> tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server for these methods (by name, from
    ``messages.METHODS``; each function takes that method's request type),
    refusing calls without ``token``; over TLS when ``tls`` is given.
    Returns (server, "host:port")."""
    handlers, bounds = {}, []
    for name, fn in unary.items():
        m = _method(name)
        if m.streaming:
            raise ValueError(f"{name} is a streaming method")
        handlers[name] = _unary_handler(m, fn)
        bounds.append(m.max_request_bytes)
    for name, fn in streams.items():
        m = _method(name)
        if not m.streaming:
            raise ValueError(f"{name} is not a streaming method")
        handlers[name] = _stream_handler(m, fn)
        bounds.append(m.max_request_bytes)
    server = grpc.aio.server(interceptors=[_TokenCheck(token)], options=[
        ("grpc.max_receive_message_length", max(bounds, default=1024)),
        ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    addr = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(addr, tls_.server_credentials(tls))
    else:
        bound = server.add_insecure_port(addr)
    if bound == 0:
        raise OSError(f"cannot listen on {addr} for worker RPCs")
    await server.start()
    return server, f"{host}:{bound}"


def _request(m: Method, req: Any) -> Any:
    """``req`` as ``m``'s request type: converted strictly when given as a dict."""
    return req if isinstance(req, m.request) else msgspec.convert(req, m.request)


class WorkerClient:
    """A channel to one worker; safe to share within one event loop."""

    def __init__(self, address: str, token: str, tls: TLSConfig | None = None):
        self.address = address
        self._md = ((TOKEN_KEY, token),)
        opts = [("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                ("grpc.max_send_message_length", max(m.max_request_bytes
                                                     for m in METHODS.values())),
                *tls_.channel_options(tls)]
        if tls is not None:
            self._channel = grpc.aio.secure_channel(address, tls_.channel_credentials(tls),
                                                    options=opts)
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

    def __init__(self, token: str, tls: TLSConfig | None = None):
        self.token = token
        self.tls = tls
        self._clients: dict[str, WorkerClient] = {}

    def get(self, address: str) -> WorkerClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = WorkerClient(address, self.token, self.tls)
        return c

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
