"""gRPC transport specifics: the hand-built frames are protobuf's own
encoding, the receiver's checks seen from a plain generated-stub client,
per-message bounds, TLS."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import pytest
import torch

from splitserve.engine.errors import IncompatibleKVError
from splitserve.handoff.transfer import kv_transfer_pb2 as pb
from splitserve.handoff.transfer import kv_transfer_pb2_grpc as pb_grpc
from splitserve.handoff.transfer import wire
from splitserve.handoff.transfer.base import TLSConfig, TransportConfig, make_header
from splitserve.handoff.transfer.chunks import as_bytes
from splitserve.handoff.transfer.errors import (ChecksumMismatch, InvalidChunkError, MessageTooLarge,
                                    PeerUnavailable, TransferAuthError, TransferError,
                                    TransferTimeout, UnknownHandoffError)
from splitserve.handoff.transfer.grpc_transport import GrpcKVReceiver, GrpcKVSender
from tests.unit.transfer_sinks import RecordingSink

pytestmark = pytest.mark.timeout(60)
TOKEN = "cluster-secret"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 70000])
def test_data_frame_is_protobufs_encoding(n):
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    encoded = pb.PushFrame(data=payload).SerializeToString()
    assert wire.encode_data_frame(memoryview(payload)) == encoded
    assert bytes(wire.decode_frame(encoded)) == payload


def test_header_frame_round_trip():
    buf = torch.ones(2, 2, 3, 4, 1, 8, dtype=torch.bfloat16)
    h = make_header("abc", 4, 6, buf)
    assert wire.decode_frame(wire.encode_header_frame(h)) == h
    assert wire.decode_frame(b"") == wire.BadFrame(0, oversized=False)
    assert wire.decode_frame(b"\xff\xff\xff") == wire.BadFrame(3, oversized=False)
    big = pb.PushFrame(header=pb.ChunkHeader(handoff_id="x" * wire.MAX_CONTROL_BYTES))
    assert wire.decode_frame(big.SerializeToString()) == \
        wire.BadFrame(big.ByteSize(), oversized=True)


def test_status_table_round_trips_every_error():
    for exc in (TransferAuthError("a"), MessageTooLarge("b"), ChecksumMismatch("c"),
                UnknownHandoffError("d"), InvalidChunkError("e"), IncompatibleKVError("f"),
                TransferTimeout("g"), PeerUnavailable("h")):
        code, details = wire.status_for(exc)
        back = wire.error_for(code, details, "grpc://x:1")
        assert type(back) is type(exc) and str(exc) in str(back)
    code, details = wire.status_for(KeyError("boom"))
    assert code == grpc.StatusCode.INTERNAL and "KeyError" in details
    assert type(wire.error_for(code, details, "e")) is TransferError


@pytest.fixture
def server():
    cfg = TransportConfig(token=TOKEN, chunk_bytes=64 << 10, max_message_bytes=(64 << 10) + 4096)
    rx = GrpcKVReceiver(cfg)
    sink = RecordingSink()
    endpoint = rx.start(sink)
    yield cfg, sink, endpoint
    rx.stop(0.2)


def _stub_push(endpoint, frames, token=TOKEN):
    """Push through the generated stub: standard protobuf messages, as any
    other gRPC client would send them."""
    with grpc.insecure_channel(wire.grpc_target(endpoint, "grpc")) as ch:
        md = [(wire.TOKEN_KEY, token)] if token else []
        return pb_grpc.KVTransferStub(ch).Push(iter(frames), timeout=10, metadata=md)


def _frames(header, data: bytes, step=1000):
    yield pb.PushFrame(header=wire.header_to_proto(header))
    for off in range(0, len(data), step):
        yield pb.PushFrame(data=data[off:off + step])


def test_generated_stub_client_is_served(server):
    _, sink, endpoint = server
    buf = torch.randn(1, 2, 3, 4, 2, 8)
    h = make_header("stub", 0, 1, buf)
    sink.reserve("stub", 1 << 20)
    reply = _stub_push(endpoint, _frames(h, as_bytes(buf).numpy().tobytes()))
    assert reply.nbytes == buf.nbytes
    assert torch.equal(sink.received("stub")[0], buf)


def _status_of(endpoint, frames, token=TOKEN):
    with pytest.raises(grpc.RpcError) as info:
        _stub_push(endpoint, frames, token)
    return info.value.code()


def test_receiver_checks_seen_from_a_plain_client(server):
    _, sink, endpoint = server
    buf = torch.randn(1, 2, 3, 4, 2, 8)
    h = make_header("w", 0, 1, buf)
    data = as_bytes(buf).numpy().tobytes()
    sink.reserve("w", 1 << 20)
    assert _status_of(endpoint, _frames(h, data), token=None) == grpc.StatusCode.UNAUTHENTICATED
    assert _status_of(endpoint, _frames(h, data), token="x") == grpc.StatusCode.UNAUTHENTICATED
    assert _status_of(endpoint, [pb.PushFrame(data=data)]) == grpc.StatusCode.INVALID_ARGUMENT
    assert _status_of(endpoint, _frames(h, data + b"!")) == grpc.StatusCode.DATA_LOSS
    assert _status_of(endpoint, _frames(h, data[:-1])) == grpc.StatusCode.DATA_LOSS
    two_headers = list(_frames(h, data))
    two_headers.insert(2, pb.PushFrame(header=wire.header_to_proto(h)))
    assert _status_of(endpoint, two_headers) == grpc.StatusCode.INVALID_ARGUMENT
    lying = h.__class__(**{**h.__dict__, "nbytes": h.nbytes + 4})
    assert _status_of(endpoint, _frames(lying, data)) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = h.__class__(**{**h.__dict__, "handoff_id": "nope"})
    assert _status_of(endpoint, _frames(unknown, data)) == grpc.StatusCode.NOT_FOUND
    assert sink.received("w") == []
    assert _stub_push(endpoint, _frames(h, data)).nbytes == len(data)


def test_messages_over_the_receivers_bound_are_refused(server):
    cfg, sink, endpoint = server
    buf = torch.randn(1, 2, 8, 16, 4, 32)  # 512 KiB
    h = make_header("m", 0, 1, buf)
    sink.reserve("m", 1 << 30)

    async def send(chunk_bytes):
        tx = GrpcKVSender(TransportConfig(token=TOKEN, chunk_bytes=chunk_bytes,
                                          max_message_bytes=chunk_bytes + 4096))
        try:
            await tx.send(endpoint, h, buf, 10.0)
        finally:
            await tx.close()

    with pytest.raises(MessageTooLarge):
        asyncio.run(send(256 << 10))
    assert sink.received("m") == []
    asyncio.run(send(cfg.chunk_bytes))
    assert torch.equal(sink.received("m")[0], buf)


def _self_signed(name: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_round_trip_and_plaintext_is_refused():
    cert, key = _self_signed("kv.splitserve.test")
    rx_cfg = TransportConfig(token=TOKEN, tls=TLSConfig(cert_chain=cert, private_key=key))
    tx_cfg = TransportConfig(token=TOKEN, tls=TLSConfig(root_certs=cert,
                                                        server_name="kv.splitserve.test"))
    rx = GrpcKVReceiver(rx_cfg)
    sink = RecordingSink()
    endpoint = rx.start(sink)
    buf = torch.randn(2, 2, 3, 4, 2, 8).to(torch.float16)
    h = make_header("tls", 0, 2, buf)
    sink.reserve("tls", 1 << 20)

    async def send(cfg):
        tx = GrpcKVSender(cfg)
        try:
            await tx.send(endpoint, h, buf, 3.0)
        finally:
            await tx.close()

    try:
        asyncio.run(send(tx_cfg))
        assert torch.equal(sink.received("tls")[0], buf)
        with pytest.raises(PeerUnavailable):  # plaintext client
            asyncio.run(send(TransportConfig(token=TOKEN)))
        with pytest.raises(PeerUnavailable):  # the cert names kv.splitserve.test, not 127.0.0.1
            asyncio.run(send(TransportConfig(token=TOKEN, tls=TLSConfig(root_certs=cert))))
        assert len(sink.received("tls")) == 1
    finally:
        rx.stop(0.2)


def test_endpoint_scheme_is_checked():
    with pytest.raises(ValueError, match="grpc://host:port"):
        wire.grpc_target("torch_dist://127.0.0.1:1", "grpc")
    with pytest.raises(ValueError):
        wire.grpc_target("grpc://nohostport", "grpc")
