"""The KV transfer plane's gate on real receivers on loopback, seen from a
plain gRPC client: every call (Push, Ping and torch_dist's pair calls) is
refused without the cluster token before any of its body is parsed; with
it, a message over its bound is refused from its raw length and a
malformed one when it does not parse; the receiver keeps serving. Then
mutual TLS."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import torch

from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import TLSConfig, TransportConfig, make_header
from splitserve.handoff.transfer.errors import PeerUnavailable
from splitserve.handoff.transfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from splitserve.handoff.transfer.torch_dist_transport import TorchDistKVReceiver, TorchDistKVSender
from tests.unit.tls_certs import CA
from tests.unit.transfer_sinks import RecordingSink

pytestmark = pytest.mark.timeout(120)
TOKEN = "cluster-secret"
Code = grpc.StatusCode
MSG = 64 << 10
CONTROL = ("Ping", "OpenPair", "Announce", "Finish", "ClosePair")
_GOOD = {"Ping": pb.PingRequest(sender_id="s"), "OpenPair": pb.OpenPairRequest(backend="gloo"),
         "Announce": pb.AnnounceRequest(pair_id="nope", seq=1),
         "Finish": pb.FinishRequest(pair_id="nope", seq=1), "ClosePair": pb.ClosePairRequest()}


class Parsed:
    """Counts what the receiver's server parses: control messages and Push frames."""

    def __init__(self, monkeypatch):
        self.control = 0
        self.frames = 0
        control, frame = wire.decode_control, wire.decode_frame

        def decode_control(cls, raw):
            self.control += 1
            return control(cls, raw)

        def decode_frame(raw):
            self.frames += 1
            return frame(raw)

        monkeypatch.setattr(wire, "decode_control", decode_control)
        monkeypatch.setattr(wire, "decode_frame", decode_frame)


@pytest.fixture(params=["grpc", "torch_dist"])
def receiver(request, monkeypatch):
    parsed = Parsed(monkeypatch)  # before start: the Push handler takes its deserializer then
    cfg = TransportConfig(token=TOKEN, chunk_bytes=MSG, max_message_bytes=MSG + 4096,
                          connect_timeout_s=5)
    rx = (GrpcKVReceiver if request.param == "grpc" else TorchDistKVReceiver)(cfg)
    sink = RecordingSink()
    endpoint = rx.start(sink)
    yield request.param, wire.grpc_target(endpoint, endpoint.split("://")[0]), sink, parsed
    rx.stop(0.2)


def _call(addr: str, method: str, body, token: str | None = TOKEN) -> Code:
    """One call with hand-made bytes (a list of frames for Push)."""
    md = [] if token is None else [(wire.TOKEN_KEY, token)]
    with grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", -1)]) as ch:
        path = f"/{wire.SERVICE}/{method}"
        try:
            if method == "Push":
                ch.stream_unary(path)(iter(body), metadata=md, timeout=20)
            else:
                ch.unary_unary(path)(body, metadata=md, timeout=20)
        except grpc.RpcError as e:
            return e.code()
    return Code.OK


def _header_frame(handoff_id="h", nbytes=4096) -> bytes:
    buf = torch.zeros(nbytes // 4, dtype=torch.float32).view(1, 2, 1, 1, 1, -1)
    return wire.encode_header_frame(make_header(handoff_id, 0, 1, buf))


def _bad(kind: str) -> dict[str, tuple[str, object, Code]]:
    """(method, body, the code a caller with the token gets) by case; pair
    calls only where the receiver serves them (torch_dist)."""
    big_header = pb.PushFrame(header=pb.ChunkHeader(
        handoff_id="h", shape=list(range(wire.MAX_CONTROL_BYTES)))).SerializeToString()
    cases = {
        "Push: a header frame past its bound": ("Push", [big_header], Code.RESOURCE_EXHAUSTED),
        "Push: a frame past max_message_bytes": (
            "Push", [_header_frame(), b"\x12" + b"\0" * (MSG + 8192)], Code.RESOURCE_EXHAUSTED),
        "Push: garbage": ("Push", [b"\xff" * 2048], Code.INVALID_ARGUMENT),
        "Ping past its bound": ("Ping", pb.PingRequest(
            sender_id="s" * wire.MAX_CONTROL_BYTES).SerializeToString(), Code.RESOURCE_EXHAUSTED),
        "Ping: garbage": ("Ping", b"\xff" * 64, Code.INVALID_ARGUMENT),
        "Ping past max_message_bytes": ("Ping", b"\0" * (MSG + 8192), Code.RESOURCE_EXHAUSTED),
    }
    if kind == "torch_dist":
        for method in CONTROL[1:]:
            cases[f"{method} past its bound"] = (method, b"\x0a\xff\x3f" + b"p" * 8191,
                                                 Code.RESOURCE_EXHAUSTED)
            cases[f"{method}: garbage"] = (method, b"\xff" * 64, Code.INVALID_ARGUMENT)
    return cases


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN[:-1], "splitserve-dev"])
def test_without_the_token_nothing_is_parsed(receiver, token):
    kind, addr, sink, parsed = receiver
    methods = CONTROL if kind == "torch_dist" else CONTROL[:1]
    sink.reserve("h", 1 << 20)
    for method in methods:
        assert _call(addr, method, _GOOD[method].SerializeToString(), token) == \
            Code.UNAUTHENTICATED, method
    assert _call(addr, "Push", [_header_frame(), b"\x12\x00"], token) == Code.UNAUTHENTICATED
    for name, (method, body, _) in _bad(kind).items():
        assert _call(addr, method, body, token) == Code.UNAUTHENTICATED, name
    assert (parsed.control, parsed.frames) == (0, 0)
    assert sink.received("h") == []
    assert _call(addr, "Ping", _GOOD["Ping"].SerializeToString()) == Code.OK


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_oversized_and_malformed_messages_are_refused_and_the_receiver_keeps_serving(receiver):
    kind, addr, sink, parsed = receiver
    sink.reserve("h", 1 << 20)
    cases = _bad(kind)
    for name, (method, body, code) in cases.items():
        assert _call(addr, method, body) == code, name
    rss0 = _rss()
    for _ in range(3):
        for name, (method, body, code) in cases.items():
            assert _call(addr, method, body) == code, name
    assert _rss() - rss0 < 32 << 20
    assert _call(addr, "Ping", _GOOD["Ping"].SerializeToString()) == Code.OK
    # and a real chunk still lands
    buf = torch.randn(1, 2, 2, 4, 1, 8)
    sink.reserve("ok", 1 << 20)

    async def send():
        sender = GrpcKVSender if kind == "grpc" else TorchDistKVSender
        tx = sender(TransportConfig(token=TOKEN, chunk_bytes=MSG, max_message_bytes=MSG + 4096,
                                    connect_timeout_s=5))
        try:
            await tx.send(f"{kind}://{addr}", make_header("ok", 0, 1, buf), buf, 10.0)
        finally:
            await tx.close()

    asyncio.run(send())
    assert torch.equal(sink.received("ok")[0], buf)


# -- mutual TLS -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["grpc", "torch_dist"])
def test_mutual_tls_round_trip_and_refusals(kind):
    ca = CA()
    replica = ca.issue("replica.splitserve.test", ips=("127.0.0.1",))
    stranger = CA().issue("stranger", ips=("127.0.0.1",))
    both = dict(cert_chain=replica.cert, private_key=replica.key, root_certs=ca.cert)
    rx_cls, tx_cls = ((GrpcKVReceiver, GrpcKVSender) if kind == "grpc"
                      else (TorchDistKVReceiver, TorchDistKVSender))
    rx = rx_cls(TransportConfig(token=TOKEN, connect_timeout_s=5,
                                tls=TLSConfig(**both, require_client_cert=True)))
    sink = RecordingSink()
    endpoint = rx.start(sink)
    buf = torch.randn(1, 2, 2, 4, 1, 8)
    sink.reserve("m", 1 << 20)

    async def send(tls):
        tx = tx_cls(TransportConfig(token=TOKEN, connect_timeout_s=5, tls=tls))
        try:
            await tx.send(endpoint, make_header("m", 0, 1, buf), buf, 5.0)
        finally:
            await tx.close()

    try:
        asyncio.run(send(TLSConfig(**both)))
        assert torch.equal(sink.received("m")[0], buf)
        for tls in (None,  # plaintext
                    TLSConfig(root_certs=ca.cert),  # no client certificate
                    TLSConfig(cert_chain=stranger.cert, private_key=stranger.key,
                              root_certs=ca.cert)):  # one the CA did not sign
            with pytest.raises(PeerUnavailable):
                asyncio.run(send(tls))
        assert len(sink.received("m")) == 1
    finally:
        rx.stop(0.2)
