"""torch_dist between two processes over gloo (the NCCL code path with CPU
tensors), pair teardown (on close, on a timeout, when the sender process
dies, when the receiver stops), and the rendezvous: a store bound to the
receiver's address, pairs that only the holders of their secret complete."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import threading
import time

import pytest
import torch

from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import torch_dist_pairs as pairs
from splitserve.handoff.transfer.base import TransportConfig, make_header
from splitserve.handoff.transfer.errors import PeerUnavailable, TransferAuthError, TransferTimeout
from splitserve.handoff.transfer.torch_dist_transport import TorchDistKVReceiver, TorchDistKVSender
from tests.unit.transfer_sinks import RecordingSink

pytestmark = pytest.mark.timeout(60)
TOKEN = "cluster-secret"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _chunk(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return (torch.randn(2, 2, 3 + i, 16, 2, 32, generator=g) * 10).to(DTYPES[i % 3])


def _sender_process(endpoint: str, n: int, close: bool, results) -> None:
    """Send chunks 0..n-1 as hand-off "p<i>"; then close, or die without a word."""
    async def main():
        tx = TorchDistKVSender(TransportConfig(token=TOKEN, connect_timeout_s=20))
        for i in range(n):
            buf = _chunk(i)
            await tx.send(endpoint, make_header(f"p{i}", 0, 2, buf), buf, 20.0)
        results.put(("sent", tx.num_pairs))
        if close:
            await tx.close()
            results.put(("closed", tx.num_pairs))
    asyncio.run(main())
    if not close:
        os._exit(0)  # no ClosePair, no clean teardown: the receiver must notice


def _wait_for(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _start(pair_idle_s=300.0):
    rx = TorchDistKVReceiver(TransportConfig(token=TOKEN, connect_timeout_s=20,
                                             pair_idle_s=pair_idle_s))
    sink = RecordingSink()
    for i in range(6):
        sink.reserve(f"p{i}", 1 << 24)
    return rx, sink, rx.start(sink)


@contextlib.contextmanager
def _sender_in_another_process(n: int, close: bool, pair_idle_s=300.0):
    """A receiver, and a process that has sent it chunks 0..n-1 over one
    pair; the process is killed if still alive and the receiver stopped on exit."""
    rx, sink, endpoint = _start(pair_idle_s)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_sender_process, args=(endpoint, n, close, results))
    proc.start()
    try:
        assert results.get(timeout=45) == ("sent", 1)
        yield rx, sink, proc, results
    finally:
        if proc.is_alive():
            proc.kill()
        rx.stop(0.2)


def test_two_processes_over_gloo_and_close_tears_down():
    with _sender_in_another_process(3, close=True) as (rx, sink, proc, results):
        assert results.get(timeout=10) == ("closed", 0)
        proc.join(10)
        assert proc.exitcode == 0
        for i in range(3):
            (got,) = sink.received(f"p{i}")
            want = _chunk(i)
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert rx.num_pairs == 0


def test_pair_of_a_dead_sender_is_reaped():
    with _sender_in_another_process(1, close=False, pair_idle_s=0.3) as (rx, sink, proc, _):
        proc.join(10)
        assert torch.equal(sink.received("p0")[0], _chunk(0))
        assert _wait_for(lambda: rx.num_pairs == 0, 5.0)


def test_timeout_tears_the_pair_down_and_the_next_send_rebuilds_it():
    rx, sink, endpoint = _start()
    sink.gate = threading.Event()
    buf = _chunk(0)

    async def main():
        tx = TorchDistKVSender(TransportConfig(token=TOKEN, connect_timeout_s=10))
        try:
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout):
                await tx.send(endpoint, make_header("p0", 0, 2, buf), buf, 0.5)
            elapsed = time.monotonic() - t0
            assert tx.num_pairs == 0
            sink.gate.set()
            sink.gate = None
            await tx.send(endpoint, make_header("p1", 0, 2, buf), buf, 10.0)
            assert tx.num_pairs == 1
            return elapsed
        finally:
            await tx.close()

    try:
        elapsed = asyncio.run(main())
        assert 0.45 <= elapsed < 1.0, elapsed
        assert torch.equal(sink.received("p1")[0], buf)
        assert _wait_for(lambda: rx.num_pairs == 0, 5.0)
    finally:
        if sink.gate is not None:
            sink.gate.set()
        rx.stop(0.2)


def test_receiver_stop_drops_the_senders_pair():
    rx, sink, endpoint = _start()
    buf = _chunk(1)

    async def main():
        tx = TorchDistKVSender(TransportConfig(token=TOKEN, connect_timeout_s=10))
        try:
            await tx.send(endpoint, make_header("p0", 0, 2, buf), buf, 10.0)
            assert tx.num_pairs == 1 and rx.num_pairs == 1
            rx.stop(0.1)
            assert rx.num_pairs == 0
            with pytest.raises(PeerUnavailable):
                await tx.send(endpoint, make_header("p1", 0, 2, buf), buf, 3.0)
            assert tx.num_pairs == 0
        finally:
            await tx.close()

    try:
        asyncio.run(main())
    finally:
        rx.stop(0.1)


# -- the rendezvous: bound to the receiver's address, pairs that prove a secret ----------
def test_the_store_listens_on_the_receivers_address_only():
    rx = TorchDistKVReceiver(TransportConfig(token=TOKEN, host="127.0.0.2", connect_timeout_s=10))
    sink = RecordingSink()
    sink.reserve("p0", 1 << 24)
    endpoint = rx.start(sink)
    port = rx._store.port
    try:
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        buf = _chunk(0)

        async def main():
            tx = TorchDistKVSender(TransportConfig(token=TOKEN, connect_timeout_s=10))
            try:
                await tx.send(endpoint, make_header("p0", 0, 2, buf), buf, 10.0)
            finally:
                await tx.close()

        asyncio.run(main())
        assert torch.equal(sink.received("p0")[0], buf)
    finally:
        rx.stop(0.2)


def _join(port: int, prefix: str, secret: bytes, rank: int, out: dict) -> None:
    """Join a pair's group as ``rank`` through the store and run the
    handshake with ``secret``; what it raised (None: nothing) goes to ``out``."""
    try:
        store = pairs.connect_store("127.0.0.1", port, 5)
        pg = pairs.new_group(store, prefix, rank, "gloo", "127.0.0.1", 5)
        try:
            pairs.handshake(pg, rank, torch.device("cpu"), secret, 3)
        finally:
            pairs.close_group(pg, abort=True)
        out[rank] = None
    except Exception as exc:  # noqa: BLE001 - the test reads it
        out[rank] = exc


def test_a_stranger_without_the_pair_secret_cannot_complete_a_pair():
    rx, sink, endpoint = _start()
    try:
        # what a caller with the token is answered; the stranger learns the prefix
        # from the store itself, which lists its keys to anyone
        rep = rx.open_pair(pb.OpenPairRequest(backend="gloo"))
        pair = rx._pairs[rep.pair_id]
        assert len(rep.pair_secret) == pairs.PAIR_SECRET_BYTES
        store = pairs.connect_store("127.0.0.1", rep.store_port, 5)
        assert _wait_for(lambda: any(k.startswith(rep.store_prefix) for k in store.list_keys()),
                         5.0)
        out: dict = {}
        wrong = bytes(b ^ 1 for b in rep.pair_secret)
        _join(rep.store_port, rep.store_prefix, wrong, pairs.SENDER_RANK, out)
        assert pair.ready.wait(10)
        assert isinstance(pair.error, TransferAuthError)
        assert out[pairs.SENDER_RANK] is not None  # never got the receiver's half
        assert rx.num_pairs == 0
        with pytest.raises(PeerUnavailable):
            rx.announce(pb.AnnounceRequest(pair_id=rep.pair_id, seq=1))
    finally:
        rx.stop(0.2)


@pytest.mark.parametrize("impostor", [pairs.SENDER_RANK, pairs.RECEIVER_RANK])
def test_each_side_checks_the_others_half_of_the_secret(impostor):
    store = pairs.new_store("127.0.0.1", 5)
    secret = pairs.new_pair_secret()
    for prefix, bad in (("ok/", None), ("bad/", impostor)):
        out: dict = {}
        half = pairs.PAIR_SECRET_BYTES // 2
        # an impostor knows at most the half the genuine side sends it
        fake = secret[:half] + bytes(half) if bad == pairs.RECEIVER_RANK else bytes(len(secret))
        threads = [threading.Thread(target=_join, args=(
            store.port, prefix, fake if rank == bad else secret, rank, out))
            for rank in (pairs.SENDER_RANK, pairs.RECEIVER_RANK)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if bad is None:
            assert out == {pairs.SENDER_RANK: None, pairs.RECEIVER_RANK: None}
        else:
            genuine = pairs.RECEIVER_RANK if bad == pairs.SENDER_RANK else pairs.SENDER_RANK
            assert isinstance(out[genuine], TransferAuthError), out
