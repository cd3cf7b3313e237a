"""Two-rank process groups for point-to-point KV transfers, built without a
global default group: one per (sender, receiver) pair, rank 0 the sender,
rank 1 the receiver, rendezvous through the receiver's TCPStore under a
prefix private to the pair. gloo for CPU tensors, NCCL for CUDA tensors.

The store listens on the receiver's address only, but has no auth of its
own (and lists its keys to anyone who connects). What keeps a stranger out
of a pair is the pair's secret: ``PAIR_SECRET_BYTES`` random bytes that
travel only in the reply to the token-checked OpenPair call. The handshake
that completes a pair, before any KV moves, has each side send its half of
the secret over the new group and the other side check it: a stranger that
joins in the sender's place cannot give the first half, one that joins in
the receiver's place learns only the first half and cannot give the second.
A pair whose check fails is torn down (``TransferAuthError``).
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from splitserve.engine.auth import secret_matches
from splitserve.handoff.transfer.base import ChunkHeader
from splitserve.handoff.transfer.errors import (PeerUnavailable, TransferAuthError, TransferError,
                                               TransferTimeout)

SENDER_RANK, RECEIVER_RANK = 0, 1
HANDSHAKE_TAG = 0  # chunk tags start at 1 (sequence numbers)
PAIR_SECRET_BYTES = 32  # the sender proves the first half, the receiver the second
BACKENDS = ("gloo", "nccl")


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def nccl_available() -> bool:
    return dist.is_nccl_available() and torch.cuda.is_available()


def new_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The receiver's store, listening on a free port of ``host`` only
    (TCPStore by itself listens on every interface): the socket is bound
    here and handed over."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()  # the store owns it from here
    try:
        return dist.TCPStore(host, port, None, True, _td(timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise


def new_pair_secret() -> bytes:
    return secrets.token_bytes(PAIR_SECRET_BYTES)


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


def handshake(pg: Any, rank: int, device: torch.device, secret: bytes, timeout_s: float) -> None:
    """Run by both sides while building the pair: the sender sends the first
    half of the pair's secret, the receiver checks it and answers with the
    second half, which the sender checks. Raises TransferAuthError when the
    peer's half is wrong. It also makes NCCL create its communicator now,
    with both sides present, instead of inside the first chunk's recv."""
    if len(secret) != PAIR_SECRET_BYTES:
        raise TransferAuthError(f"a pair secret of {len(secret)} bytes, not {PAIR_SECRET_BYTES}: "
                                f"the receiver predates authenticated pairs")
    half = PAIR_SECRET_BYTES // 2
    mine, theirs = (secret[:half], secret[half:]) if rank == SENDER_RANK else \
        (secret[half:], secret[:half])
    peer = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK

    def send() -> None:
        buf = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device)
        wait_work(pg.send([buf], peer, HANDSHAKE_TAG), timeout_s, "pair handshake")

    def receive_and_check() -> None:
        buf = torch.zeros(len(theirs), dtype=torch.uint8, device=device)
        wait_work(pg.recv([buf], peer, HANDSHAKE_TAG), timeout_s, "pair handshake")
        if not secret_matches(buf.cpu().numpy().tobytes(), theirs):
            raise TransferAuthError("the peer that joined the pair did not present the pair's "
                                    "secret; it is not the one OpenPair was answered to")

    if rank == SENDER_RANK:
        send()
        receive_and_check()
    else:
        receive_and_check()
        send()


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
    secret: bytes  # new_pair_secret(): see handshake
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
        if isinstance(self.error, TransferAuthError):
            raise TransferAuthError(f"pair {self.pair_id}: {self.error}")
        if self.error is not None or self.pg is None:
            raise PeerUnavailable(f"pair {self.pair_id}: could not be built: {self.error}")
        return self.pg
