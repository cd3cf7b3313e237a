"""Errors across the worker RPC plane: one table, both directions.

A worker that fails a call puts a ``WorkerError`` (kind, message, param)
in the gRPC status details, under the status code of its kind. The client
raises an ``RpcError`` that is also an instance of the exception class the
worker raised: ``except OutOfBlocksError`` and ``except RpcError`` (with
``.code``, ``.kind``, ``.message``, ``.param``) both catch it. Status codes
are fixed per kind; callers may rely on them.

Two kinds tell a request's own fault from a replica's: REQUEST_FAILED (the
engine failed this request alone and keeps serving) and ENGINE_DEAD (the
engine stopped while or before it ran this request). A worker that no
longer answers leaves no kind at all (UNAVAILABLE, a cut stream).
"""

from __future__ import annotations

import grpc
import msgspec

from splitserve.engine.errors import (AdapterUnavailableError, EngineDeadError, IncompatibleKVError,
                                     InvalidRequestError, OutOfBlocksError, RequestFailedError)
from splitserve.handoff.messages import ErrorKind, WorkerError
from splitserve.handoff.transfer import errors as terr

Code = grpc.StatusCode

# exception class -> (kind, status code), most specific first
_KINDS: list[tuple[type[BaseException], ErrorKind, grpc.StatusCode]] = [
    (InvalidRequestError, ErrorKind.INVALID_REQUEST, Code.INVALID_ARGUMENT),
    (OutOfBlocksError, ErrorKind.OUT_OF_BLOCKS, Code.RESOURCE_EXHAUSTED),
    (IncompatibleKVError, ErrorKind.INCOMPATIBLE_KV, Code.FAILED_PRECONDITION),
    (AdapterUnavailableError, ErrorKind.ADAPTER_UNAVAILABLE, Code.FAILED_PRECONDITION),
    (terr.UnknownHandoffError, ErrorKind.UNKNOWN_HANDOFF, Code.NOT_FOUND),
    (terr.TransferTimeout, ErrorKind.TRANSFER_TIMEOUT, Code.DEADLINE_EXCEEDED),
    (terr.MessageTooLarge, ErrorKind.MESSAGE_TOO_LARGE, Code.RESOURCE_EXHAUSTED),
    (terr.TransferAuthError, ErrorKind.TRANSFER_AUTH, Code.UNAUTHENTICATED),
    (terr.ChecksumMismatch, ErrorKind.CHECKSUM_MISMATCH, Code.UNAVAILABLE),
    (terr.PeerUnavailable, ErrorKind.PEER_UNAVAILABLE, Code.UNAVAILABLE),
    (terr.InvalidChunkError, ErrorKind.INVALID_CHUNK, Code.UNAVAILABLE),
    (terr.TransferError, ErrorKind.TRANSFER_FAILED, Code.UNAVAILABLE),
    (TimeoutError, ErrorKind.TIMEOUT, Code.DEADLINE_EXCEEDED),
    (RequestFailedError, ErrorKind.REQUEST_FAILED, Code.INTERNAL),
    (EngineDeadError, ErrorKind.ENGINE_DEAD, Code.UNAVAILABLE),
]
_encode = msgspec.json.encode  # status details are text
_decode = msgspec.json.Decoder(WorkerError).decode


class RpcError(Exception):
    """A worker call failed. ``kind`` is None when no worker answered
    (unreachable, cancelled, past its deadline on this side)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None,
                 kind: ErrorKind | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind


def _remote_class(base: type[BaseException]) -> type[RpcError]:
    return type(f"Remote{base.__name__}", (RpcError, base), {"__module__": __name__})


# kind -> the class a client raises: RpcError and the worker's exception class
_REMOTE = {kind: _remote_class(cls) for cls, kind, _ in _KINDS}


def worker_error(exc: BaseException) -> tuple[grpc.StatusCode, WorkerError]:
    """What a worker answers for ``exc``: its status code and typed error."""
    message = getattr(exc, "message", None) or str(exc)
    param = getattr(exc, "param", None)
    if isinstance(exc, RpcError):  # a call this worker made: pass its answer on
        return exc.code, WorkerError(kind=exc.kind or ErrorKind.UPSTREAM, message=message,
                                     param=param)
    for cls, kind, code in _KINDS:
        if isinstance(exc, cls):
            return code, WorkerError(kind=kind, message=message, param=param)
    return Code.INTERNAL, WorkerError(kind=ErrorKind.INTERNAL, message=message, param=None)


def details(err: WorkerError) -> str:
    return _encode(err).decode()


def unauthenticated() -> tuple[grpc.StatusCode, str]:
    return Code.UNAUTHENTICATED, details(WorkerError(
        kind=ErrorKind.UNAUTHENTICATED, message="missing or wrong cluster token", param=None))


def client_error(code: grpc.StatusCode, text: str | None) -> RpcError:
    """The exception a client raises for a failed call: the worker's class
    when it answered with a WorkerError, else a plain RpcError."""
    try:
        err = _decode(text or "")
    except msgspec.DecodeError:  # no worker answered (transport, deadline, cancel)
        return RpcError(code, text or "")
    cls = _REMOTE.get(err.kind, RpcError)
    return cls(code, err.message, err.param, err.kind)
