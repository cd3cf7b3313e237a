"""Checks and byte views shared by every transport.

A chunk is one contiguous KV buffer for a layer range, as made by
``splitserve.kernels.ops.pack_kv``: ``[layer_end - layer_start, 2, n, BS, Hk, D]``.
On the wire it is only its raw bytes; the header says how to view them
again. Senders and receivers of every transport run the same checks here so
that a malformed chunk fails the same way whatever carried it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from splitserve.handoff.transfer.errors import ChecksumMismatch, InvalidChunkError, MessageTooLarge

try:  # ISA-L's crc32: the same values as zlib's, several times faster (SIMD)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32
CRC32_IMPL = _crc32.__module__  # "isal.isal_zlib" or "zlib"

if TYPE_CHECKING:
    from splitserve.handoff.transfer.base import ChunkHeader, KVSink

# crc32 values are 0 .. 2**32-1, so -1 can only mean "sender computed none".
NO_CHECKSUM = -1

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidChunkError(
            f"dtype {dtype} cannot be transferred; supported: {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidChunkError(
            f"chunk dtype {name!r} is not one of {sorted(DTYPES)}") from None


def as_bytes(buf: torch.Tensor) -> torch.Tensor:
    """The buffer's bytes as a flat uint8 tensor on its own device: a view
    when ``buf`` is contiguous (what pack_kv makes), else one copy."""
    return buf.contiguous().view(torch.uint8).reshape(-1)  # [nbytes]


def host_bytes(buf: torch.Tensor) -> torch.Tensor:
    """``as_bytes`` on the CPU: copies device buffers to host memory."""
    return as_bytes(buf).cpu()


def crc32(data: torch.Tensor | memoryview | bytes, crc: int = 0) -> int:
    """zlib crc32 of a CPU uint8 tensor or any bytes-like, continuing ``crc``."""
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    return _crc32(data, crc)


def check_header(header: "ChunkHeader") -> None:
    """Raise InvalidChunkError unless the header describes a non-empty,
    self-consistent chunk (layer count, dtype, nbytes, checksum range)."""
    h = header
    if not h.handoff_id:
        raise InvalidChunkError("chunk header has an empty handoff_id")
    if h.layer_start < 0 or h.layer_end <= h.layer_start:
        raise InvalidChunkError(
            f"hand-off {h.handoff_id!r}: layer range [{h.layer_start}, {h.layer_end}) is empty "
            f"or negative; send at least one layer")
    if not h.shape or h.shape[0] != h.layer_end - h.layer_start:
        raise InvalidChunkError(
            f"hand-off {h.handoff_id!r}: shape {tuple(h.shape)} must lead with the layer count "
            f"{h.layer_end - h.layer_start} of [{h.layer_start}, {h.layer_end})")
    if any(d < 0 for d in h.shape):
        raise InvalidChunkError(
            f"hand-off {h.handoff_id!r}: negative dimension in {tuple(h.shape)}")
    itemsize = torch.empty((), dtype=dtype_from_name(h.dtype)).element_size()
    want = math.prod(h.shape) * itemsize
    if h.nbytes != want:
        raise InvalidChunkError(
            f"hand-off {h.handoff_id!r}: nbytes {h.nbytes} but shape {tuple(h.shape)} of "
            f"{h.dtype} holds {want}")
    if h.nbytes == 0:
        raise InvalidChunkError(
            f"hand-off {h.handoff_id!r}: chunk of shape {tuple(h.shape)} holds no bytes; "
            f"skip the transfer when there are no blocks to move")
    if h.checksum != NO_CHECKSUM and not 0 <= h.checksum < 2**32:
        raise InvalidChunkError(f"hand-off {h.handoff_id!r}: checksum {h.checksum} is not a crc32")


def check_buffer(header: "ChunkHeader", buf: torch.Tensor) -> None:
    """Raise InvalidChunkError unless ``buf`` is what ``header`` describes."""
    if tuple(buf.shape) != tuple(header.shape) or dtype_name(buf.dtype) != header.dtype:
        raise InvalidChunkError(
            f"hand-off {header.handoff_id!r}: buffer is {tuple(buf.shape)} {buf.dtype} but the "
            f"header says {tuple(header.shape)} {header.dtype}; build it with make_header(buf)")


def admit(header: "ChunkHeader", sink: "KVSink", require_checksum: bool) -> None:
    """The receiver's gate before it takes any bytes: a valid header, with a
    crc32 if the receiver requires one, for a live reservation that still has
    room. Raises InvalidChunkError, UnknownHandoffError (from the sink) or
    MessageTooLarge."""
    check_header(header)
    if require_checksum and header.checksum == NO_CHECKSUM:
        raise InvalidChunkError(
            f"hand-off {header.handoff_id!r}: chunk carries no checksum but this receiver "
            f"requires one; build headers with make_header(..., checksum=True)")
    allowed = sink.expect(header.handoff_id)
    if header.nbytes > allowed:
        raise MessageTooLarge(
            f"hand-off {header.handoff_id!r}: chunk of {header.nbytes} bytes (layers "
            f"[{header.layer_start}, {header.layer_end})) exceeds the {allowed} bytes its "
            f"reservation still allows")


def verify_checksum(header: "ChunkHeader", crc: int) -> None:
    """Compare the receiver's crc32 of the arrived bytes with the header's
    (chunks admitted without one are not checked)."""
    if header.checksum != NO_CHECKSUM and crc != header.checksum:
        raise ChecksumMismatch(
            f"hand-off {header.handoff_id!r}: crc32 of layers [{header.layer_start}, "
            f"{header.layer_end}) is {crc:#010x} but the header says {header.checksum:#010x}; "
            f"the bytes were corrupted in transit")


def receive_buffer(header: "ChunkHeader", device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh flat uint8 buffer the receiver fills with the chunk's bytes."""
    return torch.empty(header.nbytes, dtype=torch.uint8, device=device)  # [nbytes]


def view_chunk(header: "ChunkHeader", data: torch.Tensor) -> torch.Tensor:
    """Reinterpret received bytes as the header's dtype and shape (no copy)."""
    return data.view(dtype_from_name(header.dtype)).reshape(header.shape)
