"""The gRPC API against hostile clients at the transport level, on a real
grpc.aio server on loopback over a real engine: a raw HTTP/2 client (h2)
that never reads, compresses a bomb, sends broken frames or metadata, or
only opens a connection; grpcio clients that flood streams and cancels.
Each gets its status code or a closed connection within a bound, frees its
admission slot and KV blocks, and the next client is served."""

import asyncio
import functools
import gzip
import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from splitserve.cluster.api.proto import splitserve_pb2 as pb
from splitserve.cluster.api.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.engine.default_model import default_model_path
from tests.fixtures.admission import AdmissionBackend
from tests.integration.api_fixtures import engines, local, wait_until  # noqa: F401
from tests.integration.test_grpc_api import KEY, MD, GrpcServerThread

STALL_S = 1.0
IDLE_S = 1.5
GENERATE = "/splitserve.v1.Generation/Generate"
LIST = "/splitserve.v1.Generation/ListModels"
LONG = pb.GenerateRequest(model="slow", text="hello", params=pb.SamplingParams(
    max_tokens=2000, ignore_eos=True, temperature=0.0))


@pytest.fixture(scope="module")
def paths():
    return {"slow": default_model_path()}


@pytest.fixture(scope="module")
def admission(local):
    return AdmissionBackend(local, {"slow": 2}, retry_after_s=0.4)


@pytest.fixture(scope="module")
def server(admission):
    s = GrpcServerThread(admission, api_keys=[KEY], write_stall_s=STALL_S, idle_s=IDLE_S)
    yield s
    s.stop()


def released(admission, local, engines):
    return (admission.in_flight("slow") == 0 and local.all_blocks_free()
            and not engines["slow"].has_unfinished())


def served(server) -> bool:
    with grpc.insecure_channel(server.target) as ch:
        return len(pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), metadata=MD,
                                                         timeout=5).models) == 1


class RawClient:
    """One HTTP/2 connection driven by hand; ``window``: the stream window
    it grants (it never grants more)."""

    def __init__(self, port: int, window: int = 65535):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        # Huffman coding in pure Python takes minutes for a megabyte of metadata
        self.h2.encoder.encode = functools.partial(self.h2.encoder.encode, huffman=False)
        self.h2.initiate_connection()
        self.flush()

    def flush(self):
        self.sock.sendall(self.h2.data_to_send())

    def call(self, path: str, body: bytes | None, extra=(), content_type="application/grpc",
             auth=f"Bearer {KEY}") -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "t"),
                   ("content-type", content_type), ("te", "trailers"), ("authorization", auth), *extra]
        self.h2.send_headers(sid, headers, end_stream=body is None)
        for i in range(0, len(body or b""), 16384):
            self.h2.send_data(sid, body[i:i + 16384], end_stream=i + 16384 >= len(body))
        self.flush()
        return sid

    def events(self, seconds: float, until_end: bool = True) -> list:
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                got.append("EOF")
                break
            try:
                got += self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:  # frames after the server's GOAWAY
                got.append("EOF")
                break
            try:
                self.flush()  # acknowledgements
            except OSError:  # the server closed the connection meanwhile
                got.append("EOF")
                break
            if until_end and any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset,
                                                h2.events.ConnectionTerminated)) for e in got):
                break
        return got

    def status(self, seconds: float = 5) -> tuple[str | None, str | None]:
        headers = {}
        for e in self.events(seconds):
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update(dict(e.headers))
        return headers.get("grpc-status"), headers.get("grpc-message")

    def close(self):
        self.sock.close()


def message(payload: bytes, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message."""
    return bytes([int(compressed)]) + struct.pack(">I", len(payload)) + payload


def test_a_stream_its_client_never_reads_ends_and_frees_its_slot_and_blocks(server, admission,
                                                                              local, engines):
    client = RawClient(server.port, window=64)  # room for one response, never more
    try:
        client.call(GENERATE, message(LONG.SerializeToString()))
        # admitted (its generation may already have been ended by the stall on a loaded machine)
        assert wait_until(lambda: admission.in_flight("slow") == 1, 5)
        # another client is served meanwhile, at full speed
        with grpc.insecure_channel(server.target) as ch:
            rs = list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
                model="slow", text="x", params=pb.SamplingParams(max_tokens=3)), metadata=MD, timeout=5))
        assert len(rs) == 3
        t0 = time.monotonic()
        assert wait_until(lambda: released(admission, local, engines), STALL_S + 3)
        assert time.monotonic() - t0 < STALL_S + 3
    finally:
        client.close()
    assert served(server)


def test_duplicate_or_mismatched_credentials_are_unauthenticated(server):
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GenerationStub(ch)

        def code(md):
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                return e.code(), e.details()

        bearer = ("authorization", f"Bearer {KEY}")
        for md in [(bearer, ("authorization", "Bearer nope")), (("authorization", "Bearer nope"), bearer),
                   (bearer, bearer), (("x-api-key", KEY), ("x-api-key", KEY))]:
            got, details = code(md)
            assert got == grpc.StatusCode.UNAUTHENTICATED and details.startswith("send one '"), md
        assert code((bearer, ("x-api-key", "nope")))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code((bearer, ("x-api-key", KEY)))[0] == grpc.StatusCode.OK
        assert code((("authorization", f"bEaReR   {KEY}  "),))[0] == grpc.StatusCode.OK
        assert code((("authorization", f"Bearer{KEY}"),))[0] == grpc.StatusCode.UNAUTHENTICATED


BOMB = gzip.compress(b"\x00" * (16 << 20))  # 16 KB that inflate past the 4 MiB limit


@pytest.mark.parametrize("name,body,extra,want", [
    ("gzip bomb", message(BOMB, True), [("grpc-encoding", "gzip")], "8"),
    ("unknown encoding", message(b"x", True), [("grpc-encoding", "zstd-nope")], "13"),
    ("compressed flag, no encoding", message(b"x", True), [], "13"),
    ("length prefix past the body", b"\x00" + struct.pack(">I", 1000) + b"abc", [], "3"),
    ("no message", None, [], "3"),
    ("bad base64 in a -bin key", message(b""), [("x-trace-bin", "!!!not base64")], "13"),
    ("non-ASCII key", message(b""), [], "16"),
    ("json content type", message(b"{}"), [("content-type", "application/grpc+json")], "3"),
    ("reflection", message(b""), [], "12"),
    ("unknown method", message(b""), [], "12"),
    ("3000 metadata keys", message(b""), [(f"x-k{i}", "v") for i in range(3000)], "0"),
])
def test_malformed_requests_get_a_status_and_the_server_serves_on(server, name, body, extra, want):
    client = RawClient(server.port)
    try:
        kw = {}
        if name == "non-ASCII key":
            kw["auth"] = "Bearer ключ"
        if name == "json content type":
            kw["content_type"], extra = "application/grpc+json", []
        path = {"reflection": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "unknown method": "/splitserve.v1.Generation/Nope"}.get(name, LIST)
        client.call(path, body, extra, **kw)
        assert client.status()[0] == want
    finally:
        client.close()
    assert served(server)


@pytest.mark.parametrize("size", [70_000, 1 << 20])
def test_metadata_past_64_kib_is_resource_exhausted(server, size):
    client = RawClient(server.port)
    try:
        client.call(LIST, message(b""), [("x-big", "a" * size)])
        assert client.status()[0] == "8"
    finally:
        client.close()
    with grpc.insecure_channel(server.target) as ch:  # gRPC's own client is refused the same
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=5,
                                                  metadata=MD + (("x-big", "a" * size),))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served(server)


@pytest.mark.parametrize("opening", [b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_connections_that_start_no_call_are_closed(server, opening):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(IDLE_S + 5)
    t0 = time.monotonic()
    try:
        sock.sendall(opening)
        while sock.recv(4096):
            pass
    finally:
        sock.close()
    assert time.monotonic() - t0 < IDLE_S + 3


def test_a_ping_flood_gets_goaway(server):
    client = RawClient(server.port)
    try:
        for i in range(50):
            client.h2.ping(struct.pack(">Q", i))
        client.flush()
        got = client.events(5)
        assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 11 for e in got)
    finally:
        client.close()
    assert served(server)


def test_a_thousand_streams_on_one_channel_and_a_cancel_flood_leak_nothing(server, admission,
                                                                          local, engines):
    async def main():
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationStub(ch)

            async def one():
                req = pb.GenerateRequest(model="slow", text="hi", params=pb.SamplingParams(max_tokens=2))
                try:
                    return len([r async for r in stub.Generate(req, metadata=MD, timeout=30)])
                except grpc.aio.AioRpcError as e:
                    return e.code()

            results = await asyncio.gather(*[one() for _ in range(1000)])
            for _ in range(200):  # open and cancel at once (RST_STREAM)
                call = stub.Generate(LONG, metadata=MD)
                await asyncio.sleep(0)
                call.cancel()
            return results

    results = asyncio.run(main())
    assert set(results) <= {2, grpc.StatusCode.RESOURCE_EXHAUSTED} and 2 in results
    assert wait_until(lambda: released(admission, local, engines), 10)
    assert served(server)


def test_a_grpc_client_that_stops_reading_mid_stream_frees_the_request(server, admission, local,
                                                                        engines):
    # grpcio's own client takes the stream into its buffers (its window grows):
    # the request runs to its end unread, and frees what it held
    request = pb.GenerateRequest(model="slow", text="hello", params=pb.SamplingParams(
        max_tokens=120, ignore_eos=True, temperature=0.0))
    with grpc.insecure_channel(server.target) as ch:
        call = pb_grpc.GenerationStub(ch).Generate(request, metadata=MD)
        next(call)
        assert wait_until(lambda: released(admission, local, engines), 10)
        assert sum(len(r.token_ids) for r in call) == 119
    assert served(server)


def test_a_client_that_half_closes_its_connection_frees_its_request(server, admission, local, engines):
    client = RawClient(server.port)
    try:
        client.call(GENERATE, message(LONG.SerializeToString()))
        assert wait_until(lambda: admission.in_flight("slow") == 1, 5)
        client.sock.shutdown(socket.SHUT_WR)  # TCP FIN: it sends nothing more
        assert "EOF" in client.events(5, until_end=False)  # gRPC closes the connection
        assert wait_until(lambda: released(admission, local, engines), 5)
    finally:
        client.close()
    assert served(server)


def test_pings_every_millisecond_during_a_stream(server, admission, local, engines):
    client = RawClient(server.port)
    try:
        client.call(GENERATE, message(LONG.SerializeToString()))
        client.sock.settimeout(0.001)
        got, t0 = [], time.monotonic()
        while time.monotonic() - t0 < 3 and not any(
                e == "EOF" or isinstance(e, h2.events.ConnectionTerminated) for e in got):
            client.h2.ping(struct.pack(">d", time.monotonic()))
            try:
                client.flush()
            except OSError:
                break
            got += client.events(0.001, until_end=False)
        # GOAWAY and closed (h2 reports what follows the GOAWAY as an error: "EOF" here)
        assert any(e == "EOF" or isinstance(e, h2.events.ConnectionTerminated) for e in got)
        assert time.monotonic() - t0 < 2
        assert wait_until(lambda: released(admission, local, engines), 5)
    finally:
        client.close()
    assert served(server)


def test_compressed_requests_and_responses(server):
    with grpc.insecure_channel(server.target, compression=grpc.Compression.Gzip) as ch:
        rs = list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(
            model="slow", text="x " * 200, params=pb.SamplingParams(max_tokens=3)), metadata=MD, timeout=10))
    assert sum(len(r.token_ids) for r in rs) == 3


def test_a_rapid_reset_flood_on_one_connection_leaks_nothing(server, admission, local, engines):
    client = RawClient(server.port)
    try:
        for _ in range(500):  # HEADERS + DATA, then RST_STREAM at once
            sid = client.call(GENERATE, message(LONG.SerializeToString()))
            client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            client.flush()
    finally:
        client.close()
    assert wait_until(lambda: released(admission, local, engines), 10)
    assert served(server)
