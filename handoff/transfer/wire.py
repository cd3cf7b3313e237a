"""gRPC wire details shared by the grpc and torch_dist transports: message
conversions, the zero-parse Push frame codec, channel options, the token
metadata and the one table between exceptions and status codes.

Push frames are ``PushFrame`` protobuf messages, but data frames are built
and read by hand (``0x12 <varint len> <bytes>`` is exactly protobuf's
encoding of field 2 ``bytes data``) so a 4 MiB slice is copied once into the
message instead of going through a protobuf object, and read as a
memoryview into gRPC's buffer instead of a fresh ``bytes``.

Bounds, checked before anything is parsed: a server takes no message over
``TransportConfig.max_message_bytes`` (gRPC's own limit: a data frame of
``chunk_bytes`` plus framing), and control messages (Ping, the pair calls,
a Push's header frame) over ``MAX_CONTROL_BYTES`` are refused from their
raw length, so no call can make a receiver build a large protobuf object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import grpc
from google.protobuf.message import DecodeError

from splitserve.engine.auth import secret_matches
from splitserve.engine.errors import IncompatibleKVError
from splitserve.handoff import tls as tls_
from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer.base import ChunkHeader, KVLayout, TransportConfig
from splitserve.handoff.transfer.errors import (ChecksumMismatch, InvalidChunkError, MessageTooLarge,
                                    PeerUnavailable, TransferAuthError, TransferError,
                                    TransferTimeout, UnknownHandoffError)

SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name
TOKEN_KEY = "splitserve-token"
# a Push's go-ahead: the receiver's initial metadata once it admitted the header
# (a refusal sends initial metadata too, empty, with its status)
PUSH_GO = ("splitserve-push", "go")
_DATA_TAG = 0x12  # field 2 (data), wire type 2 (length-delimited)
_HTTP2_MAX_FRAME = (1 << 24) - 1
# the largest control message or Push header frame: its real ones are under
# 300 bytes (a header with a 6-dim shape and a 256-character hand-off id)
MAX_CONTROL_BYTES = 4 << 10

# One table, both directions: which status a receiver-side exception becomes
# and which exception a sender raises for that status. Order matters for
# isinstance (subclasses first).
_STATUS = (
    (TransferAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ChecksumMismatch, grpc.StatusCode.DATA_LOSS),
    (UnknownHandoffError, grpc.StatusCode.NOT_FOUND),
    (InvalidChunkError, grpc.StatusCode.INVALID_ARGUMENT),
    (IncompatibleKVError, grpc.StatusCode.FAILED_PRECONDITION),
    (TransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Receiver side: the status and details to abort a call with."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"receiver failed: {type(exc).__name__}: {exc}"


def error_for(code: grpc.StatusCode, details: str | None, endpoint: str) -> Exception:
    """Sender side: the exception a failed call's status stands for."""
    msg = f"{endpoint}: {details or code.name}"
    for cls, c in _STATUS:
        if c == code:
            return cls(msg)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return TransferError(f"{msg} (the receiver does not serve this call; check that both "
                             f"sides use the same transport)")
    return TransferError(msg)


def rpc_error(exc: grpc.RpcError, endpoint: str) -> Exception:
    return error_for(exc.code(), exc.details(), endpoint)


def token_metadata(config: TransportConfig) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_KEY, config.token),)


def token_ok(metadata: Sequence[tuple[str, str | bytes]], token: str) -> bool:
    return secret_matches(next((v for k, v in metadata if k == TOKEN_KEY), None), token)


def grpc_target(endpoint: str, scheme: str) -> str:
    """``"<scheme>://host:port"`` -> ``"host:port"``."""
    prefix = f"{scheme}://"
    if not endpoint.startswith(prefix) or ":" not in endpoint[len(prefix):]:
        raise ValueError(f"endpoint {endpoint!r} is not a {scheme} endpoint ({prefix}host:port); "
                         f"use the string the receiver's start() returned")
    return endpoint[len(prefix):]


# -- messages -----------------------------------------------------------------

def header_to_proto(h: ChunkHeader) -> pb.ChunkHeader:
    return pb.ChunkHeader(handoff_id=h.handoff_id, layer_start=h.layer_start,
                          layer_end=h.layer_end, shape=list(h.shape), dtype=h.dtype,
                          nbytes=h.nbytes, checksum=h.checksum)


def header_from_proto(m: pb.ChunkHeader) -> ChunkHeader:
    return ChunkHeader(m.handoff_id, m.layer_start, m.layer_end, tuple(m.shape), m.dtype,
                       m.nbytes, m.checksum)


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(**layout.to_dict())


def layout_from_proto(m: pb.KVLayout) -> KVLayout:
    return KVLayout(m.model_id, m.dtype, m.kv_dtype, m.block_size, m.num_layers,
                    m.num_kv_heads, m.head_dim, m.layout,
                    tensor_parallel_size=m.tensor_parallel_size or 1,
                    kv_head_start=m.kv_head_start, kv_head_end=m.kv_head_end)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while pos < len(raw) and shift < 64:
        b = raw[pos]
        n |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return n, pos
        shift += 7
    return -1, pos


def encode_header_frame(h: ChunkHeader) -> bytes:
    return pb.PushFrame(header=header_to_proto(h)).SerializeToString()


def encode_data_frame(data: memoryview) -> bytes:
    """PushFrame(data=...) wire bytes with a single copy of ``data``."""
    return b"".join((bytes((_DATA_TAG,)), _varint(len(data)), data))


@dataclass(frozen=True)
class BadFrame:
    """A Push frame the receiver will not use: over MAX_CONTROL_BYTES without
    being a lone data field (left unparsed), or not a header or data frame.
    (A deserializer may not fail or return None: gRPC would answer INTERNAL.)"""

    nbytes: int
    oversized: bool


def decode_frame(raw: bytes) -> ChunkHeader | memoryview | BadFrame:
    """Push request deserializer: a header, a view of the data bytes, or a BadFrame."""
    if raw[:1] == bytes((_DATA_TAG,)):
        n, pos = _read_varint(raw, 1)
        if n >= 0 and pos + n == len(raw):  # a lone data field: view it in place
            return memoryview(raw)[pos:]
    if len(raw) > MAX_CONTROL_BYTES:
        return BadFrame(len(raw), oversized=True)
    try:
        frame = pb.PushFrame.FromString(raw)
    except DecodeError:
        return BadFrame(len(raw), oversized=False)
    which = frame.WhichOneof("body")
    if which == "header":
        return header_from_proto(frame.header)
    if which == "data":
        return memoryview(frame.data)
    return BadFrame(len(raw), oversized=False)


def decode_control(cls: Any, raw: bytes) -> Any:
    """A control call's request (``cls``, a protobuf message type) from its
    raw bytes: MessageTooLarge over MAX_CONTROL_BYTES, InvalidChunkError when
    it does not parse."""
    if len(raw) > MAX_CONTROL_BYTES:
        raise MessageTooLarge(f"a {cls.DESCRIPTOR.name} of {len(raw)} bytes; control messages "
                              f"are at most {MAX_CONTROL_BYTES}")
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise InvalidChunkError(f"malformed {cls.DESCRIPTOR.name}") from None


# -- channels -----------------------------------------------------------------

def channel_options(config: TransportConfig) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", 1 << 20),
        # big HTTP/2 frames: fewer frame headers and wakeups per MiB
        ("grpc.http2.max_frame_size", _HTTP2_MAX_FRAME),
        # no sharing of connections with other channels to the same target
        ("grpc.use_local_subchannel_pool", 1),
        *tls_.channel_options(config.tls),
    ]


def server_options(config: TransportConfig) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 1 << 20),
        ("grpc.http2.max_frame_size", _HTTP2_MAX_FRAME),
        ("grpc.so_reuseport", 0),  # a fixed port must not be shared with a stale server
    ]


def channel_credentials(config: TransportConfig) -> grpc.ChannelCredentials | None:
    return None if config.tls is None else tls_.channel_credentials(config.tls)


def server_credentials(config: TransportConfig) -> grpc.ServerCredentials | None:
    return None if config.tls is None else tls_.server_credentials(config.tls)
