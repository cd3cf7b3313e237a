"""Every transport against the same contract, on real servers on 127.0.0.1
(torch_dist: sender and receiver in one process over gloo; the two-process
case is in test_transfer_torch_dist.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from splitserve.handoff.transfer.base import KVLayout, TransportConfig, get_transport, make_header
from splitserve.handoff.transfer.chunks import NO_CHECKSUM, as_bytes
from splitserve.handoff.transfer.errors import (ChecksumMismatch, InvalidChunkError, MessageTooLarge,
                                    PeerUnavailable, TransferAuthError, TransferTimeout,
                                    UnknownHandoffError)
from splitserve.kernels import ops
from tests.unit.transfer_sinks import CacheSink, RecordingSink

pytestmark = pytest.mark.timeout(60)

TOKEN = "cluster-secret"
MSG = 64 << 10  # small gRPC messages so modest buffers span many of them


class Rig:
    """A started receiver of one transport and a way to run a sender against it."""

    def __init__(self, name: str, sink=None, **cfg):
        self.name = name
        self.cfg = TransportConfig(token=TOKEN, chunk_bytes=MSG, max_message_bytes=MSG + 4096,
                                   connect_timeout_s=10, **cfg)
        self.sender_cls, receiver_cls = get_transport(name)
        self.receiver = receiver_cls(self.cfg)
        self.sink = sink if sink is not None else RecordingSink()
        self.endpoint = self.receiver.start(self.sink)

    def run(self, fn, **cfg):
        """Run ``fn(sender)`` in a fresh loop with a sender of this config
        (overridden by ``cfg``), closing the sender after."""
        async def main():
            tx = self.sender_cls(dataclasses.replace(self.cfg, **cfg))
            try:
                return await fn(tx)
            finally:
                await tx.close()
        return asyncio.run(main())

    def send(self, header, buf, timeout_s=10.0, **cfg):
        return self.run(lambda tx: tx.send(self.endpoint, header, buf, timeout_s), **cfg)

    def close(self):
        if getattr(self.sink, "gate", None) is not None:
            self.sink.gate.set()
        self.receiver.stop(0.2)


TRANSPORTS = ["grpc", "torch_dist", "inproc"]


@pytest.fixture(params=TRANSPORTS)
def rig(request):
    r = Rig(request.param)
    yield r
    r.close()


def _buffer(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 1, 4, 1, 8), (4, 2, 7, 16, 2, 64), (3, 2, 5, 16, 3, 40)])
def test_round_trip_is_bytewise_identical(rig, dtype, shape):
    buf = _buffer(shape, dtype, seed=len(shape) + shape[2])
    header = make_header("req-1", 2, 2 + shape[0], buf)
    rig.sink.reserve("req-1", buf.nbytes)
    rig.send(header, buf)
    (got,) = rig.sink.received("req-1")
    assert _same_bytes(got, buf)
    assert rig.sink.chunks["req-1"][0][0] == header
    assert rig.sink.allowed["req-1"] == 0


def test_multi_message_sizes(rig):
    # exact multiples of the message size, one byte over, and the remainder case
    for i, n in enumerate([MSG, 3 * MSG, 3 * MSG + 2, 5 * MSG - 2]):
        buf = torch.arange(n // 2, dtype=torch.int16).view(torch.float16).reshape(1, -1)
        header = make_header(f"h{i}", 0, 1, buf)
        rig.sink.reserve(f"h{i}", buf.nbytes)
        rig.send(header, buf)
        assert _same_bytes(rig.sink.received(f"h{i}")[0], buf)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_layer_groups_land_in_the_reserved_blocks(name):
    src = _buffer((6, 2, 10, 4, 2, 16), torch.bfloat16, seed=3)  # [L, 2, NB, BS, Hk, D]
    dst = torch.zeros_like(src)
    sink = CacheSink(dst)
    r = Rig(name, sink=sink)
    try:
        sink.reserve("seq", [5, 0, 9])
        src_blocks = torch.tensor([3, 7, 1])

        async def send_groups(tx):
            for l0 in (0, 2, 4):
                buf = ops.pack_kv(src, src_blocks, l0, l0 + 2)  # [2, 2, 3, BS, Hk, D]
                await tx.send(r.endpoint, make_header("seq", l0, l0 + 2, buf), buf, 10.0)

        r.run(send_groups)
    finally:
        r.close()
    assert torch.equal(dst[:, :, [5, 0, 9]], src[:, :, [3, 7, 1]])
    untouched = [b for b in range(10) if b not in (5, 0, 9)]
    assert not dst[:, :, untouched].any()
    assert sink.layers["seq"] == set(range(6))


def test_empty_ranges_are_rejected(rig):
    buf = _buffer((2, 2, 1, 4, 1, 8), torch.float32)
    with pytest.raises(InvalidChunkError, match="empty"):
        make_header("e", 3, 3, buf[:0])
    with pytest.raises(InvalidChunkError, match="no bytes"):
        make_header("e", 0, 2, buf[:, :, :0])
    rig.sink.reserve("e", 1 << 20)
    bad = dataclasses.replace(make_header("e", 0, 2, buf), layer_end=0)
    with pytest.raises(InvalidChunkError):
        rig.send(bad, buf)
    assert rig.sink.received("e") == []


def test_wrong_token_is_refused_and_receiver_keeps_serving(rig):
    buf = _buffer((1, 2, 2, 4, 1, 8), torch.float16)
    header = make_header("t", 0, 1, buf)
    rig.sink.reserve("t", 1 << 20)
    with pytest.raises(TransferAuthError):
        rig.send(header, buf, token="not-the-secret")
    with pytest.raises(TransferAuthError):
        rig.run(lambda tx: tx.ping(rig.endpoint, 5.0), token="not-the-secret")
    assert rig.sink.received("t") == []
    rig.send(header, buf)
    assert _same_bytes(rig.sink.received("t")[0], buf)


def test_a_refusal_reaches_a_grpc_sender_as_the_receivers_status():
    # Refused while frames stream, a call's status is lost (grpc.aio reports the
    # failed write as INTERNAL: 5-10% of such sends before the sender waited for
    # the header's go-ahead). A chunk of 64 messages, refused for its token and
    # for its size, again and again: always the receiver's own reason, no bytes taken.
    rig = Rig("grpc")
    try:
        buf = _buffer((2, 2, 64, 16, 2, 64), torch.float32)  # 4 MiB
        header = make_header("r", 0, 2, buf)
        rig.sink.reserve("r", buf.nbytes - 1)
        for _ in range(12):
            with pytest.raises(TransferAuthError):
                rig.send(header, buf, token="not-the-secret")
            with pytest.raises(MessageTooLarge, match="exceeds"):
                rig.send(header, buf)
        assert rig.sink.received("r") == []
    finally:
        rig.close()


def test_a_grpc_receiver_without_the_go_ahead_still_gets_its_chunks(monkeypatch):
    # an older receiver: its Ping says nothing of push_ack, so frames go at once
    from splitserve.handoff.transfer.grpc_server import TransferService
    ping = TransferService.ping
    monkeypatch.setattr(TransferService, "ping",
                        lambda self, req: _cleared(ping(self, req), "push_ack"))
    rig = Rig("grpc")
    try:
        buf = _buffer((2, 2, 4, 16, 2, 64), torch.float16)
        rig.sink.reserve("old", buf.nbytes)
        rig.send(make_header("old", 0, 2, buf), buf)
        assert _same_bytes(rig.sink.received("old")[0], buf)
    finally:
        rig.close()


def _cleared(message, field):
    message.ClearField(field)
    return message


def test_oversized_chunk_is_refused_and_receiver_keeps_serving(rig):
    buf = _buffer((2, 2, 4, 4, 2, 8), torch.float32)
    header = make_header("big", 0, 2, buf)
    rig.sink.reserve("big", buf.nbytes - 1)
    with pytest.raises(MessageTooLarge, match="exceeds"):
        rig.send(header, buf)
    assert rig.sink.received("big") == []
    rig.sink.reserve("big", buf.nbytes)
    rig.send(header, buf)
    assert _same_bytes(rig.sink.received("big")[0], buf)


def test_corruption_in_transit_is_detected(rig):
    buf = _buffer((2, 2, 3, 16, 2, 32), torch.bfloat16)  # several messages
    header = make_header("c", 0, 2, buf)
    rig.sink.reserve("c", 1 << 30)
    # the bytes that travel differ in one bit from those the header describes
    on_the_wire = buf.clone()
    as_bytes(on_the_wire)[100] ^= 0x40
    with pytest.raises(ChecksumMismatch, match="crc32"):
        rig.send(header, on_the_wire)
    assert rig.sink.received("c") == []
    with pytest.raises(ChecksumMismatch):
        rig.send(dataclasses.replace(header, checksum=header.checksum ^ 1), buf)
    rig.send(header, buf)
    assert _same_bytes(rig.sink.received("c")[0], buf)


def test_unchecked_chunks_need_the_receiver_to_allow_them(rig):
    buf = _buffer((1, 2, 2, 4, 1, 8), torch.float32)
    header = make_header("u", 0, 1, buf, checksum=False)
    assert header.checksum == NO_CHECKSUM
    rig.sink.reserve("u", 1 << 20)
    with pytest.raises(InvalidChunkError, match="requires one"):
        rig.send(header, buf)
    relaxed = Rig(rig.name, require_checksum=False)
    try:
        relaxed.sink.reserve("u", 1 << 20)
        relaxed.send(header, buf)
        assert _same_bytes(relaxed.sink.received("u")[0], buf)
    finally:
        relaxed.close()


def test_unknown_handoff(rig):
    buf = _buffer((1, 2, 1, 4, 1, 8), torch.float32)
    with pytest.raises(UnknownHandoffError, match="nobody"):
        rig.send(make_header("nobody", 0, 1, buf), buf)


def test_buffer_must_match_its_header(rig):
    buf = _buffer((1, 2, 2, 4, 1, 8), torch.float32)
    header = make_header("m", 0, 1, buf)
    rig.sink.reserve("m", 1 << 20)
    with pytest.raises(InvalidChunkError, match="header says"):
        rig.send(header, buf.to(torch.float16))


def test_receiver_that_never_answers_times_out(rig):
    buf = _buffer((1, 2, 2, 4, 1, 8), torch.float32)
    header = make_header("slow", 0, 1, buf)
    rig.sink.reserve("slow", 1 << 20)
    rig.sink.gate = threading.Event()

    async def timed_send(tx):
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            await tx.send(rig.endpoint, header, buf, 0.5)
        return time.monotonic() - t0

    elapsed = rig.run(timed_send)
    assert 0.45 <= elapsed < 1.0, elapsed
    assert rig.sink.entered.is_set()
    rig.sink.gate.set()
    rig.sink.gate = None
    rig.sink.reserve("fast", 1 << 20)
    rig.send(make_header("fast", 0, 1, buf), buf)
    assert _same_bytes(rig.sink.received("fast")[0], buf)


def test_concurrent_sends_from_one_sender(rig):
    bufs = [_buffer((1, 2, 3, 8, 2, 16), torch.bfloat16, seed=i) for i in range(4)]
    for i in range(4):
        rig.sink.reserve(f"c{i}", 1 << 20)

    async def all_at_once(tx):
        await asyncio.gather(*(tx.send(rig.endpoint, make_header(f"c{i}", 0, 1, b), b, 10.0)
                               for i, b in enumerate(bufs)))

    rig.run(all_at_once)
    for i, b in enumerate(bufs):
        assert _same_bytes(rig.sink.received(f"c{i}")[0], b)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_ping_reports_the_receivers_layout(name):
    layout = KVLayout("llama-tiny", "bfloat16", "bfloat16", 16, 4, 2, 64)
    r = Rig(name, layout=layout)
    try:
        info = r.run(lambda tx: tx.ping(r.endpoint, 5.0))
    finally:
        r.close()
    assert info.layout == layout
    assert name in info.transports
    assert info.receiver_id == r.receiver.receiver_id


def test_stopped_receiver_is_unavailable(rig):
    buf = _buffer((1, 2, 1, 4, 1, 8), torch.float32)
    rig.sink.reserve("gone", 1 << 20)
    rig.receiver.stop(0.1)
    with pytest.raises(PeerUnavailable):
        rig.send(make_header("gone", 0, 1, buf), buf, timeout_s=5.0)
