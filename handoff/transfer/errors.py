"""Exceptions of the KV transfer data plane.

Every transport raises these same classes on the sending side, whatever the
wire, so a prefill worker decides what to do (retry on another decode
replica, prefill locally, fail the request) from the class alone.
"""

from __future__ import annotations

from splitserve.engine.errors import SplitserveError


class TransferError(SplitserveError):
    """A KV chunk did not reach the receiver's sink."""


class TransferTimeout(TransferError, TimeoutError):
    """The receiver did not acknowledge the chunk within the send's timeout."""


class TransferAuthError(TransferError, PermissionError):
    """The receiver rejected the sender's cluster token (missing or wrong)."""


class ChecksumMismatch(TransferError):
    """The bytes that arrived differ from what the header declares: wrong
    length, or a crc32 that does not match."""


class UnknownHandoffError(TransferError):
    """The receiver holds no live reservation for this hand-off id (never
    reserved, committed already, cancelled, or its lease ran out)."""


class MessageTooLarge(TransferError):
    """A chunk exceeds what the receiver allows: the bytes its reservation
    still admits, or the largest single message it accepts."""


class PeerUnavailable(TransferError, ConnectionError):
    """The receiver cannot be reached (not started, stopped, or gone)."""


class InvalidChunkError(TransferError, ValueError):
    """A chunk header is malformed or inconsistent with its buffer (empty
    layer range, shape/dtype/nbytes disagree, unsupported dtype)."""
