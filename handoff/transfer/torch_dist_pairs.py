"""Two-rank process groups for point-to-point KV transfers, built without a
global default group: one per (sender, receiver) pair, rank 0 the sender,
rank 1 the receiver, rendezvous through the receiver's TCPStore under a
prefix private to the pair. gloo for CPU tensors, NCCL for CUDA tensors.
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from splitserve.handoff.transfer.base import ChunkHeader
from splitserve.handoff.transfer.errors import PeerUnavailable, TransferError, TransferTimeout

SENDER_RANK, RECEIVER_RANK = 0, 1
HANDSHAKE_TAG = 0  # chunk tags start at 1 (sequence numbers)
BACKENDS = ("gloo", "nccl")


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def nccl_available() -> bool:
    return dist.is_nccl_available() and torch.cuda.is_available()


def new_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The receiver's store, listening on a free port."""
    return dist.TCPStore(host, 0, None, True, _td(timeout_s), wait_for_workers=False)


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, _td(timeout_s))


def new_group(store: dist.Store, prefix: str, rank: int, backend: str, host: str,
              timeout_s: float) -> Any:
    """Build this side of a pair's group; blocks until the peer joins or
    ``timeout_s`` passes (then raises RuntimeError)."""
    pstore = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _td(timeout_s)
        if host in ("", "0.0.0.0", "::", "[::]"):
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(pstore, rank, 2, opts)
    if backend == "nccl":
        if not nccl_available():
            raise TransferError("NCCL pair requested but this process has no CUDA/NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupNCCL(pstore, rank, 2, opts)
    raise TransferError(f"unknown pair backend {backend!r}; expected one of {BACKENDS}")


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (no packet is sent):
    what the sender's gloo device must listen on for the receiver to reach it."""
    family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def handshake(pg: Any, rank: int, device: torch.device, timeout_s: float) -> None:
    """One byte from sender to receiver, run by both sides while building the
    pair. It proves the pair works and makes NCCL create its communicator
    now, with both sides present, instead of inside the first chunk's recv."""
    probe = torch.ones(1, dtype=torch.uint8, device=device)
    if rank == SENDER_RANK:
        work = pg.send([probe], RECEIVER_RANK, HANDSHAKE_TAG)
    else:
        work = pg.recv([probe], SENDER_RANK, HANDSHAKE_TAG)
    wait_work(work, timeout_s, "pair handshake")


def close_group(pg: Any, abort: bool) -> None:
    """Release a pair's group. ``abort`` also cancels operations in flight
    (used after a timeout or a lost peer)."""
    try:
        if abort:
            pg.abort()
        else:
            pg.shutdown()
    except Exception:  # teardown is best effort: the peer may be gone already
        pass


def wait_work(work: Any, timeout_s: float, what: str) -> None:
    """Wait for a send/recv, raising TransferTimeout after ``timeout_s`` and
    PeerUnavailable when the backend reports the peer gone."""
    if timeout_s <= 0:
        raise TransferTimeout(f"{what}: no time left")
    try:
        work.wait(_td(timeout_s))
    except RuntimeError as exc:
        if "Timed out" in str(exc) or "timeout" in str(exc).lower():
            raise TransferTimeout(f"{what} did not complete within {timeout_s:.3f} s") from None
        raise PeerUnavailable(f"{what} failed, peer lost: {exc}") from None


def tag_of(seq: int) -> int:
    return (seq - 1) % 0x7FFFFFFE + 1  # 1 .. 2**31-1, never the handshake's


@dataclass
class Pending:
    """A chunk announced on a pair whose recv is posted."""

    header: ChunkHeader
    base: torch.Tensor  # the buffer to give back to the pool (CPU), or the device buffer
    data: torch.Tensor  # [nbytes] uint8 view being received into
    work: Any


@dataclass
class RxPair:
    """The receiver's state of one pair."""

    pair_id: str
    backend: str
    prefix: str
    ready: threading.Event = field(default_factory=threading.Event)
    pg: Any = None
    error: BaseException | None = None
    pending: dict[int, Pending] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def wait_ready(self, timeout_s: float) -> Any:
        if not self.ready.wait(timeout_s):
            raise TransferTimeout(
                f"pair {self.pair_id}: sender did not join within {timeout_s:.1f} s")
        if self.error is not None or self.pg is None:
            raise PeerUnavailable(f"pair {self.pair_id}: could not be built: {self.error}")
        return self.pg
