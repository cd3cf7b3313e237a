"""The receiver's gRPC server: token check on every call, Push (a chunk
streamed as raw bytes) and Ping, plus the torch_dist pair calls when a pair
handler is given. Used by both the grpc and torch_dist receivers.

Every call, in order: the token in its metadata is checked as the call
starts, before its body is read (a call without it is refused
UNAUTHENTICATED, its body never read) -> each message is bounded by
gRPC (``max_message_bytes``) and, for control messages and header frames,
by ``wire.MAX_CONTROL_BYTES`` from its raw length (RESOURCE_EXHAUSTED) ->
only then parsed (INVALID_ARGUMENT when it does not parse).

Push, per call: header -> ``chunks.admit`` (valid, live reservation, fits)
-> a buffer taken -> initial metadata sent: the go-ahead senders wait for
before their data frames (``PingReply.push_ack``), so a refused chunk's
bytes never travel and its status reaches the sender whole -> bytes copied into one preallocated buffer as frames arrive, crc32 taken
on the way -> length and crc32 checked -> ``sink.write_layers`` -> reply.
Any failure aborts only that call with the status ``wire.status_for`` maps
its exception to; the server keeps serving.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Protocol

import grpc
import torch

from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import ChunkHeader, KVSink, TransportConfig
from splitserve.handoff.transfer.buffers import BufferPool
from splitserve.handoff.transfer.chunks import NO_CHECKSUM, admit, crc32, verify_checksum, view_chunk
from splitserve.handoff.transfer.errors import (ChecksumMismatch, InvalidChunkError,
                                               MessageTooLarge, TransferTimeout)

class PairHandler(Protocol):
    """The torch_dist receiver's side of the pair calls; each returns the
    reply message or raises a TransferError subclass."""

    def open_pair(self, req: pb.OpenPairRequest) -> pb.OpenPairReply: ...
    def announce(self, req: pb.AnnounceRequest) -> pb.AnnounceReply: ...
    def finish(self, req: pb.FinishRequest) -> pb.FinishReply: ...
    def close_pair(self, req: pb.ClosePairRequest) -> pb.ClosePairReply: ...


def _deny(_requests, context):
    # takes the request stream and never reads it: nothing of the body is parsed
    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                  "missing or wrong cluster token; sender and receiver must share "
                  "TransportConfig.token")


# request-streaming whatever the method, so gRPC hands it the body unread
_DENY = grpc.stream_unary_rpc_method_handler(_deny)


class _TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the cluster token, as it
    starts (after its headers, before its body)."""

    def __init__(self, token: str):
        self._token = token

    def intercept_service(self, continuation, details):
        if wire.token_ok(details.invocation_metadata or (), self._token):
            return continuation(details)
        return _DENY


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, details = wire.status_for(exc)
    context.abort(code, details)


class TransferService:
    """Handlers of the KVTransfer service for one sink."""

    def __init__(self, config: TransportConfig, sink: KVSink, receiver_id: str,
                 transports: tuple[str, ...], pairs: PairHandler | None = None):
        self.config = config
        self.sink = sink
        self.receiver_id = receiver_id
        self.transports = transports
        self.pairs = pairs
        self.buffers = BufferPool(config.buffer_pool_bytes)

    def push(self, frames: Iterator, context: grpc.ServicerContext) -> pb.PushReply:
        try:
            header = next(frames, None)
            if isinstance(header, wire.BadFrame) and header.oversized:
                raise MessageTooLarge(f"a Push header frame of {header.nbytes} bytes; at most "
                                      f"{wire.MAX_CONTROL_BYTES}")
            if not isinstance(header, ChunkHeader):
                raise InvalidChunkError("a Push call must start with a header frame")
            admit(header, self.sink, self.config.require_checksum)
            base = self.buffers.acquire(header.nbytes)
            try:
                context.send_initial_metadata((wire.PUSH_GO,))  # senders stream data after it
                data = self._receive(header, frames, base[:header.nbytes])
                if not context.is_active():  # the sender gave up: do not store behind its back
                    raise TransferTimeout(f"hand-off {header.handoff_id!r}: sender went away")
                self.sink.write_layers(header, view_chunk(header, data))
            finally:
                self.buffers.release(base)
        except Exception as exc:  # every failure becomes this call's status
            _abort(context, exc)
        return pb.PushReply(nbytes=header.nbytes)

    def _receive(self, header: ChunkHeader, frames: Iterator, data: torch.Tensor) -> torch.Tensor:
        # data: [nbytes] uint8, filled in place
        dst = memoryview(data.numpy())
        check = header.checksum != NO_CHECKSUM
        crc, off = 0, 0
        for frame in frames:
            if not isinstance(frame, memoryview):
                raise InvalidChunkError(
                    f"hand-off {header.handoff_id!r}: only data frames may follow the header")
            end = off + len(frame)
            if end > header.nbytes:
                raise ChecksumMismatch(
                    f"hand-off {header.handoff_id!r}: more than the {header.nbytes} bytes the "
                    f"header declares arrived")
            dst[off:end] = frame
            if check:
                crc = crc32(dst[off:end], crc)
            off = end
        if off != header.nbytes:
            raise ChecksumMismatch(
                f"hand-off {header.handoff_id!r}: stream ended after {off} of {header.nbytes} "
                f"bytes")
        verify_checksum(header, crc)
        return data

    def ping(self, req: pb.PingRequest) -> pb.PingReply:
        reply = pb.PingReply(receiver_id=self.receiver_id, transports=list(self.transports),
                             push_ack=True)
        if self.config.layout is not None:
            reply.layout.CopyFrom(wire.layout_to_proto(self.config.layout))
        return reply

    def handlers(self) -> grpc.GenericRpcHandler:
        rpcs = {
            "Push": grpc.stream_unary_rpc_method_handler(
                self.push, request_deserializer=wire.decode_frame,
                response_serializer=pb.PushReply.SerializeToString),
            "Ping": _control(self.ping, pb.PingRequest, pb.PingReply),
        }
        if self.pairs is not None:
            for rpc, method, req, rep in (
                    ("OpenPair", "open_pair", pb.OpenPairRequest, pb.OpenPairReply),
                    ("Announce", "announce", pb.AnnounceRequest, pb.AnnounceReply),
                    ("Finish", "finish", pb.FinishRequest, pb.FinishReply),
                    ("ClosePair", "close_pair", pb.ClosePairRequest, pb.ClosePairReply)):
                rpcs[rpc] = _control(getattr(self.pairs, method), req, rep)
        return grpc.method_handlers_generic_handler(wire.SERVICE, rpcs)


def _control(fn: Callable, request: Any, reply: Any) -> grpc.RpcMethodHandler:
    """A unary control call: the raw request bounded and parsed here
    (``wire.decode_control``), so an oversized or malformed one gets its own
    status instead of gRPC's deserialization failure."""
    def call(raw: bytes, context: grpc.ServicerContext):
        try:
            return fn(wire.decode_control(request, raw))
        except Exception as exc:
            _abort(context, exc)
    return grpc.unary_unary_rpc_method_handler(call, response_serializer=reply.SerializeToString)


class TransferServer:
    """A started gRPC server around a TransferService."""

    def __init__(self, config: TransportConfig, service: TransferService):
        self._executor = ThreadPoolExecutor(max_workers=config.max_workers,
                                            thread_name_prefix="kv-transfer-rx")
        self._server = grpc.server(self._executor, handlers=[service.handlers()],
                                   interceptors=[_TokenInterceptor(config.token)],
                                   options=wire.server_options(config))
        addr = f"{config.host}:{config.port}"
        creds = wire.server_credentials(config)
        try:
            if creds is None:
                self.port = self._server.add_insecure_port(addr)
            else:
                self.port = self._server.add_secure_port(addr, creds)
        except RuntimeError as exc:
            self._executor.shutdown(wait=False)
            raise OSError(f"cannot listen on {addr} for KV transfers: {exc}") from exc
        self._server.start()

    def stop(self, grace_s: float) -> None:
        self._server.stop(grace_s).wait()
        # handlers still inside a slow sink finish on their own; do not wait for them
        self._executor.shutdown(wait=False, cancel_futures=True)
