"""The KV transfer seam: what a prefill replica's sender and a decode
replica's receiver agree on, whatever carries the bytes.

Hand-off protocol (driven by the workers, not here): decode reserves blocks
under a hand-off id with a lease -> prefill sends the KV layer group by layer
group, each as one chunk (``ChunkHeader`` + contiguous buffer) -> decode
commits -> prefill frees its blocks after the ack. This module is the data
plane of the middle step: one ``KVSender.send`` moves one chunk into the
receiving engine's ``KVSink``, authenticated by the cluster token, bounded by
the reservation, checked against its crc32 and finished within a deadline or
failed with a specific ``splitserve.handoff.transfer.errors`` exception.

Transports are chosen by name (``get_transport``): ``grpc`` (any network),
``torch_dist`` (NCCL between GPUs, gloo between CPUs) and ``inproc``
(colocated roles, tests). All take a ``TransportConfig`` and have the same
methods.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from splitserve.engine.errors import IncompatibleKVError
from splitserve.handoff.tls import TLSConfig
from splitserve.handoff.transfer.chunks import NO_CHECKSUM, as_bytes, check_header, crc32, dtype_name

LAYOUT_VERSION = "L2NBHD-v1"  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]


class KVLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What must match between two engines for KV blocks to move between them.
    A wire type too: hand-off messages (``splitserve.handoff.messages``)
    carry it, decoded strictly (an unknown or mistyped field is refused).

    Tensor parallelism: ``tensor_parallel_size`` is the engine's degree and
    may differ between the two ends (it is reported, not compared);
    [``kv_head_start``, ``kv_head_end``) are the KV heads the end sends or
    receives in its chunks, and must be the same. A tensor-parallel engine
    gathers and scatters its ranks' heads at rank 0
    (``splitserve.engine.parallel.kv``), so every engine today moves every
    head: (0, num_kv_heads); ``kv_head_end`` 0 means that too (peers that
    predate the field)."""

    model_id: str
    dtype: str
    kv_dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = LAYOUT_VERSION
    tensor_parallel_size: int = 1
    kv_head_start: int = 0
    kv_head_end: int = 0

    def kv_heads(self) -> tuple[int, int]:
        """[start, end) of the KV heads this end's chunks carry."""
        return self.kv_head_start, self.kv_head_end or self.num_kv_heads

    def check_compatible(self, other: "KVLayout") -> None:
        """Raise IncompatibleKVError naming every field that differs."""
        reported = ("tensor_parallel_size", "kv_head_start", "kv_head_end")
        diffs = [f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
                 for name in self.__struct_fields__
                 if name not in reported and getattr(self, name) != getattr(other, name)]
        if self.kv_heads() != other.kv_heads():
            diffs.append(f"KV heads carried: {self.kv_heads()} != {other.kv_heads()}")
        if diffs:
            raise IncompatibleKVError(
                "KV layouts differ, so blocks cannot move between these engines ("
                + "; ".join(diffs) + "); pair replicas that serve the same model and cache config")

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVLayout":
        return msgspec.convert(d, cls)


@dataclass(frozen=True)
class ChunkHeader:
    """One chunk: layers [layer_start, layer_end) of a hand-off's blocks."""

    handoff_id: str
    layer_start: int
    layer_end: int
    shape: tuple[int, ...]  # [layer_end - layer_start, planes (2, or 1: ModelConfig.kv_planes), n, BS, Hk, D]
    dtype: str  # name in chunks.DTYPES, e.g. "bfloat16"
    nbytes: int
    checksum: int  # crc32 (zlib) of the raw bytes; NO_CHECKSUM if the sender skipped it


def make_header(handoff_id: str, l0: int, l1: int, buf: torch.Tensor,
                checksum: bool = True) -> ChunkHeader:
    """Header for ``buf`` = pack_kv(cache, blocks, l0, l1). The crc32 needs the
    bytes on the host; pass ``checksum=False`` to skip it for device buffers
    going over NCCL (receivers must then allow unchecked chunks)."""
    crc = crc32(as_bytes(buf).cpu()) if checksum else NO_CHECKSUM
    header = ChunkHeader(handoff_id, int(l0), int(l1), tuple(int(d) for d in buf.shape),
                         dtype_name(buf.dtype), buf.numel() * buf.element_size(), crc)
    check_header(header)
    return header


@dataclass(frozen=True)
class TransportConfig:
    """How a sender or receiver runs; the same class for every transport,
    fields a transport has no use for are ignored by it."""

    token: str  # shared cluster secret; every call carries it and receivers check it
    host: str = "127.0.0.1"  # receiver: bind address (its gloo pairs listen there too)
    port: int = 0  # receiver: port to listen on, 0 picks a free one
    tls: TLSConfig | None = None  # gRPC channels (torch_dist's control channel too)
    # sender: bytes per gRPC data message; 0.5-1 MiB measured best on loopback (larger
    # messages fall out of cache, smaller ones pay per-message overhead)
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 4 << 20  # receiver: largest single gRPC message accepted
    require_checksum: bool = True  # receiver: reject chunks whose header carries no crc32
    device: str = "cpu"  # torch_dist receiver: where NCCL chunks land
    layout: KVLayout | None = None  # receiver: reported by ping for the compatibility handshake
    max_workers: int = 8  # receiver: concurrent calls served
    buffer_pool_bytes: int = 256 << 20  # receiver: receive buffers kept for reuse
    pair_idle_s: float = 300.0  # torch_dist receiver: drop pairs unused this long
    connect_timeout_s: float = 30.0  # torch_dist: bound on building one pair's process group

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("TransportConfig.token is empty; set the cluster's shared "
                             "transfer token")
        if self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.chunk_bytes + 64 > self.max_message_bytes:
            raise ValueError(
                f"chunk_bytes {self.chunk_bytes} (+64 bytes of framing) exceeds "
                f"max_message_bytes {self.max_message_bytes}; receivers would refuse every "
                f"data message")


@dataclass(frozen=True)
class PeerInfo:
    """A receiver's answer to ping: who it is and what it serves."""

    receiver_id: str
    transports: tuple[str, ...]
    layout: KVLayout | None
    push_ack: bool = False  # gRPC receivers: it admits a Push's header before its data


class KVSink(ABC):
    """Where received chunks go. Implemented by the decode side (the engine's
    reservation table); called by a receiver, possibly from several threads."""

    @abstractmethod
    def expect(self, handoff_id: str) -> int:
        """Called once per incoming chunk before any bytes are taken. Returns
        the bytes still allowed for this hand-off; raises UnknownHandoffError
        if no live reservation exists."""

    @abstractmethod
    def write_layers(self, header: ChunkHeader, buf: torch.Tensor) -> None:
        """Called once per received, verified chunk with ``buf`` of the
        header's shape and dtype. ``buf`` is valid only during the call (the
        receiver reuses it): copy the bytes in (``unpack_kv``), do not keep
        it. Returns when the bytes are stored; may raise UnknownHandoffError
        (lease ran out) or MessageTooLarge (does not fit)."""


class KVSender(ABC):
    """Prefill side. One instance per process, shared by all its hand-offs;
    caches connections per endpoint. Methods are called from one event loop."""

    def __init__(self, config: TransportConfig):
        self.config = config

    @abstractmethod
    async def send(self, endpoint: str, header: ChunkHeader, buf: torch.Tensor,
                   timeout_s: float) -> None:
        """Move one chunk to the receiver at ``endpoint`` (as returned by its
        ``start``). Returns once the sink stored it; raises a TransferError
        subclass otherwise, TransferTimeout after ``timeout_s`` seconds. After
        a timeout a sink that was already writing may still finish: the
        caller cancels the reservation rather than assume nothing landed."""

    @abstractmethod
    async def ping(self, endpoint: str, timeout_s: float) -> PeerInfo:
        """Handshake/health: the receiver's id, transports and KV layout."""

    @abstractmethod
    async def close(self) -> None:
        """Release every cached connection. The sender is unusable after."""


class KVReceiver(ABC):
    """Decode side. Serves in background threads until ``stop``."""

    def __init__(self, config: TransportConfig):
        self.config = config

    @abstractmethod
    def start(self, sink: KVSink) -> str:
        """Start serving into ``sink``. Returns the endpoint senders use."""

    @abstractmethod
    def stop(self, grace_s: float = 1.0) -> None:
        """Stop accepting; give calls in flight ``grace_s`` seconds to end."""


_TRANSPORTS = {
    "grpc": ("splitserve.handoff.transfer.grpc_transport", "GrpcKVSender", "GrpcKVReceiver"),
    "torch_dist": ("splitserve.handoff.transfer.torch_dist_transport", "TorchDistKVSender",
                   "TorchDistKVReceiver"),
    "inproc": ("splitserve.handoff.transfer.inproc", "InprocKVSender", "InprocKVReceiver"),
}
TRANSPORT_NAMES = tuple(_TRANSPORTS)


def get_transport(name: str) -> tuple[type[KVSender], type[KVReceiver]]:
    """(sender class, receiver class) of the transport called ``name``."""
    try:
        module, sender, receiver = _TRANSPORTS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transport {name!r}; choose one of {TRANSPORT_NAMES}") from None
    mod = importlib.import_module(module)
    return getattr(mod, sender), getattr(mod, receiver)
