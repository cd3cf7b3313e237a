"""The router stream (``cluster/serve/router_stream.py``): its framing and
hello, a real server and client on 127.0.0.1 (also under mutual TLS, with
certificates made here), and RouterClient placing through a router
actor's stream (the actor called in process, no Ray)."""

import asyncio
import ssl
import time

import msgspec
import pytest

from splitserve.cluster.serve import router_stream as rs
from splitserve.cluster.serve.router_client import RouterClient
from splitserve.cluster.serve.router_fanout import RouterFanout
from splitserve.cluster.serve.router_names import router_order
from splitserve.handoff.tls import TLSConfig
from splitserve.router.exchange import Exchange, RouteCall
from splitserve.router.exchange_codec import decode_reply, encode_exchange
from splitserve.router.reports import decode_report, encode_report
from splitserve.router.types import Placement
from tests.unit.test_router_actor import prefill
from tests.unit.test_router_client import FakeRouter, _Method, place, req
from tests.unit.tls_certs import CA

TOKEN = bytes(range(rs.TOKEN_BYTES))


# -- framing and hello ----------------------------------------------------------------
def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_frames_round_trip_back_to_back():
    async def main():
        r = _reader(rs.frame(b"") + rs.frame(b"abc") + rs.frame(bytes(70000)))
        assert [await rs.read_frame(r) for _ in range(3)] == [b"", b"abc", bytes(70000)]
        with pytest.raises(rs.StreamError, match="0 bytes of 4"):
            await rs.read_frame(r)  # the stream ended cleanly between frames
    asyncio.run(main())


def test_a_truncated_frame_is_a_stream_error():
    async def main():
        with pytest.raises(rs.StreamError, match="2 bytes of 5"):
            await rs.read_frame(_reader(rs.frame(b"hello")[:-3]))
        with pytest.raises(rs.StreamError, match="2 bytes of 4"):
            await rs.read_frame(_reader(b"\x00\x00"))
    asyncio.run(main())


def test_an_oversized_frame_is_refused_before_its_body_is_read():
    async def main():
        r = _reader(rs.frame(bytes(100)))
        with pytest.raises(rs.FrameTooLargeError, match="100 bytes"):
            await rs.read_frame(r, max_bytes=99)
        assert len(await r.read()) == 100  # the body was left unread
    asyncio.run(main())
    with pytest.raises(rs.FrameTooLargeError):
        rs.frame(bytes(rs.MAX_FRAME_BYTES + 1))


def test_hello_is_checked_for_protocol_version_and_token():
    good = rs.hello(TOKEN, rs.STATS)
    assert len(good) == rs.HELLO_BYTES
    assert rs.check_hello(good, TOKEN) == rs.STATS
    with pytest.raises(rs.HandshakeError, match="not a router stream"):
        rs.check_hello(b"GET / HTTP/1.1\r\n" + bytes(22), TOKEN)
    with pytest.raises(rs.HandshakeError, match="not a router stream"):
        rs.check_hello(good[:-1], TOKEN)
    with pytest.raises(rs.HandshakeError, match="version 9"):
        rs.check_hello(rs.MAGIC + b"\x09\x01" + TOKEN, TOKEN)
    with pytest.raises(rs.HandshakeError, match="wrong router stream token"):
        rs.check_hello(rs.hello(bytes(rs.TOKEN_BYTES), rs.EXCHANGE), TOKEN)
    with pytest.raises(rs.HandshakeError, match="32 bytes"):
        rs.hello(b"short", rs.EXCHANGE)


# -- a real server and client -----------------------------------------------------------
def _echo(data: bytes) -> bytes:
    if data == b"boom":
        raise ValueError("a request the router cannot decode")
    return data[::-1]


def test_calls_over_a_real_connection_and_a_bad_request_ends_only_its_stream():
    async def main():
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1")
        ep = await server.start()
        assert await server.start() is ep  # listens once
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0)
        assert [await stream.call(b"abc"), await stream.call(bytes(100000))] == [b"cba",
                                                                                  bytes(100000)]
        both = await asyncio.gather(stream.call(b"12"), stream.call(b"34"))  # one at a time
        assert both == [b"21", b"43"]
        with pytest.raises(rs.StreamError):
            await stream.call(b"boom")
        assert stream.closed
        with pytest.raises(rs.StreamError, match="closed"):
            await stream.call(b"abc")
        again = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0)
        assert await again.call(b"xy") == b"yx"
        again.close()
        server.close()
    asyncio.run(main())


def test_a_connection_without_the_token_gets_nothing():
    async def main():
        served = []
        server = rs.RouterStreamServer({rs.EXCHANGE: lambda d: served.append(d) or d}, "127.0.0.1")
        ep = await server.start()
        wrong = rs.StreamEndpoint(ep.host, ep.port, bytes(rs.TOKEN_BYTES))
        with pytest.raises(rs.HandshakeError, match="closed the stream at its hello"):
            await rs.RouterStream.open(wrong, rs.EXCHANGE, 2.0)
        # a raw client that skips the hello and sends a frame is closed unanswered
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(rs.frame(b"x" * 64))
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
        with pytest.raises(rs.HandshakeError, match="version 2"):
            await rs.RouterStream.open(rs.StreamEndpoint(ep.host, ep.port, ep.token, 2),
                                       rs.EXCHANGE, 2.0)
        assert served == []
        server.close()
    asyncio.run(main())


def test_an_oversized_frame_closes_the_connection():
    async def main():
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1")
        ep = await server.start()
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(rs.hello(ep.token, rs.EXCHANGE))
        assert await reader.readexactly(5) == rs.MAGIC + bytes((rs.VERSION,))
        writer.write((rs.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
        server.close()
    asyncio.run(main())


# -- a router actor's stream ------------------------------------------------------------
class StreamRouter(FakeRouter):
    """FakeRouter whose exchanges may also go over the actor's real stream."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls["endpoint"] = 0
        self.endpoint = self._Endpoint(self)

    class _Endpoint:
        def __init__(self, router):
            self.router = router

        def remote(self):
            async def call():
                if self.router.dead:
                    raise ConnectionError("actor died")
                self.router.calls["endpoint"] += 1
                return await self.router.actor.endpoint()
            return call()

    def kill(self):
        self.dead = True
        self.actor._stream.close()


def test_the_router_answers_the_same_bytes_on_its_stream_as_to_an_actor_call():
    router = StreamRouter()

    async def main():
        ep = await router.actor.endpoint()
        assert ep.host == "127.0.0.1"  # no Ray here; a cluster's router listens on its node IP
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0)
        now = time.time()
        ex = Exchange("h", calls=(RouteCall("l1", req(1), now, now),))
        reply = decode_reply(await stream.call(encode_exchange(ex)))
        assert isinstance(reply.outcomes[0], Placement)
        with pytest.raises(rs.StreamError):  # not an exchange: the router closes the stream
            await stream.call(b"\x93\x01\x02")
        stream.close()
        router.actor._stream.close()

    asyncio.run(main())
    assert router.counters()["in_flight"] == {"m": 1}


def test_client_places_over_the_stream_and_moves_on_when_its_router_dies():
    first, second = router_order("m", 2)
    routers = [StreamRouter(), StreamRouter()]
    client = RouterClient(2, heartbeat_s=0.05, handles=routers)

    async def main():
        done = await asyncio.gather(*(place(client, i) for i in range(20)))
        assert all(isinstance(p, Placement) for p in done)
        assert routers[first].calls["exchange"] == 0  # every exchange went over the stream
        assert client.counts["stream_exchanges"] == client.counts["exchanges"] > 0
        running = [asyncio.ensure_future(place(client, 100 + i, hold_s=0.3)) for i in range(4)]
        await asyncio.sleep(0.15)  # heartbeats carry the held slots to the standby
        routers[first].kill()
        more = await asyncio.gather(*running, place(client, 200))
        assert len(more) == 5
        await asyncio.sleep(0.15)
        await client.close()
        routers[second].actor._stream.close()

    asyncio.run(main())
    c = routers[second].counters()
    assert client.counts["failovers"] >= 1
    assert (c["in_flight"], c["unbalanced_releases"], c["decisions"]) == ({"m": 0}, 0, 1)


def test_client_uses_actor_calls_when_a_router_offers_no_stream():
    router = FakeRouter()  # an older router: no endpoint method
    client = RouterClient(1, heartbeat_s=0.05, handles=[router])

    async def main():
        await asyncio.gather(*(place(client, i) for i in range(4)))
        await client.close()

    asyncio.run(main())
    assert client.counts["stream_exchanges"] == 0 and router.calls["exchange"] > 0
    assert router.counters()["in_flight"] == {"m": 0}


def test_a_connection_of_an_unknown_kind_is_refused():
    async def main():
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1")
        ep = await server.start()
        with pytest.raises(rs.HandshakeError, match="closed the stream at its hello"):
            await rs.RouterStream.open(ep, rs.STATS, 2.0)
        server.close()
    asyncio.run(main())


# -- stats pushes ------------------------------------------------------------------------
def test_a_stats_report_round_trips_and_a_malformed_one_is_refused():
    r = prefill(stored=[1, 2, 3])
    assert decode_report(encode_report(r)) == r
    with pytest.raises(msgspec.ValidationError):
        decode_report(msgspec.msgpack.encode({"replica": "p0"}))
    with pytest.raises(msgspec.DecodeError):
        decode_report(b"\xc1")


def test_pushes_go_over_the_stream_and_a_dead_router_is_asked_again():
    routers = [StreamRouter(), StreamRouter()]
    fanout = RouterFanout(2, handles=routers, timeout_s=2.0)

    async def main():
        calls = routers[0].calls
        # a delta from a replica the routers do not know: they ask for a snapshot
        assert await fanout.push(prefill(rid="p1", stored=[7, 8])) is True
        assert await fanout.push(prefill(rid="p1", stored=[9], snapshot=True)) is False
        assert calls.get("update_stats", 0) == 0 and calls["endpoint"] == 1
        routers[0].kill()
        # the other router still takes it; the next push after the dead one is
        # back must be a snapshot (it missed pushes)
        assert await fanout.push(prefill(rid="p1", stored=[10])) is False
        routers[0].dead = False
        routers[0].actor._stream = None  # restarted: it listens anew
        assert await fanout.push(prefill(rid="p1", stored=[11])) is True
        assert calls["endpoint"] == 2 and calls.get("update_stats", 0) == 0
        fanout.close()
        for r in routers:
            r.actor._stream.close()

    asyncio.run(main())
    assert routers[1].actor.cached_blocks() == {"d0": 0, "p0": 0, "p1": 3}


def test_pushes_use_actor_calls_when_a_router_offers_no_stream():
    router = FakeRouter()
    router.update_stats = _Method(router, "update_stats")
    fanout = RouterFanout(1, handles=[router], timeout_s=2.0)
    assert asyncio.run(fanout.push(prefill(rid="p1", stored=[1], snapshot=True))) is False
    assert router.calls["update_stats"] == 1 and router.actor.cached_blocks()["p1"] == 1


# -- TLS (transfer.tls) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the router's / replicas' certificate it signs (for 127.0.0.1),
    and a stranger's CA and certificate; the section as an operator writes it."""
    folder = tmp_path_factory.mktemp("router-tls")
    ca, other = CA(), CA("another-ca")
    mine, theirs = ca.issue("router", ips=("127.0.0.1",)), other.issue("router",
                                                                        ips=("127.0.0.1",))
    cert, key = mine.write(folder, "router")
    (folder / "ca.crt").write_bytes(ca.cert)
    section = {"cert": cert, "key": key, "ca": str(folder / "ca.crt"), "mutual": True}
    tls = TLSConfig(cert_chain=mine.cert, private_key=mine.key, root_certs=ca.cert,
                    require_client_cert=True)
    stranger = TLSConfig(cert_chain=theirs.cert, private_key=theirs.key, root_certs=ca.cert)
    return {"tls": tls, "section": section, "stranger": stranger, "other_ca": other.cert}


def test_exchanges_cross_a_tls_stream_with_the_token_checked_inside(pki):
    async def main():
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1", pki["tls"])
        ep = await server.start()
        assert ep.tls
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, pki["tls"])
        assert stream._writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        assert await stream.call(b"abc") == b"cba"
        stream.close()
        wrong = rs.StreamEndpoint(ep.host, ep.port, bytes(rs.TOKEN_BYTES), tls=True)
        with pytest.raises(rs.HandshakeError, match="closed the stream at its hello"):
            await rs.RouterStream.open(wrong, rs.EXCHANGE, 2.0, pki["tls"])
        server.close()
        # without mutual TLS (as the worker RPC plane) a client needs only the CA
        one_way = TLSConfig(cert_chain=pki["tls"].cert_chain, private_key=pki["tls"].private_key)
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1", one_way)
        ep = await server.start()
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0,
                                            TLSConfig(root_certs=pki["tls"].root_certs))
        assert await stream.call(b"abc") == b"cba"
        stream.close()
        server.close()
    asyncio.run(main())


def test_a_plaintext_client_is_refused_by_a_tls_router_which_keeps_serving(pki):
    async def main():
        served = []
        server = rs.RouterStreamServer({rs.EXCHANGE: lambda d: served.append(d) or d},
                                       "127.0.0.1", pki["tls"])
        ep = await server.start()
        # a client without TLS does not even dial: the endpoint says TLS
        with pytest.raises(rs.HandshakeError, match="TLS only"):
            await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0)
        # one that dials anyway, with the right token in the clear, gets nothing
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        writer.write(rs.hello(ep.token, rs.EXCHANGE) + rs.frame(b"x"))
        assert await asyncio.wait_for(reader.read(), 2.0) == b""
        writer.close()
        assert served == []
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, pki["tls"])
        assert await stream.call(b"ok") == b"ok" and served == [b"ok"]
        stream.close()
        server.close()
    asyncio.run(main())


def test_a_client_of_another_ca_is_refused_and_refuses_a_router_it_cannot_verify(pki):
    async def main():
        served = []
        server = rs.RouterStreamServer({rs.EXCHANGE: lambda d: served.append(d) or d},
                                       "127.0.0.1", pki["tls"])
        ep = await server.start()
        # mutual TLS: the router refuses a certificate its CA did not sign
        # (under TLS 1.3 the client learns it at its first read)
        with pytest.raises((ssl.SSLError, rs.StreamError, ConnectionError)):
            stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, pki["stranger"])
            await stream.call(b"x")
        # the client verifies the router: a CA that did not sign its certificate fails it
        doubting = TLSConfig(cert_chain=pki["tls"].cert_chain, private_key=pki["tls"].private_key,
                             root_certs=pki["other_ca"])
        with pytest.raises(ssl.SSLCertVerificationError):
            await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, doubting)
        # and its name: a certificate for 127.0.0.1 is not one for "router.elsewhere"
        renamed = TLSConfig(cert_chain=pki["tls"].cert_chain, private_key=pki["tls"].private_key,
                            root_certs=pki["tls"].root_certs, server_name="router.elsewhere")
        with pytest.raises(ssl.SSLCertVerificationError):
            await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, renamed)
        assert served == []
        server.close()
    asyncio.run(main())


def test_a_stalled_tls_handshake_is_dropped(pki):
    async def main():
        server = rs.RouterStreamServer({rs.EXCHANGE: _echo}, "127.0.0.1", pki["tls"],
                                       hello_timeout_s=0.3)
        ep = await server.start()
        reader, writer = await asyncio.open_connection(ep.host, ep.port)
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3.0) == b""  # closed, not held
        assert time.monotonic() - t0 < 2.0
        writer.close()
        stream = await rs.RouterStream.open(ep, rs.EXCHANGE, 2.0, pki["tls"])
        assert await stream.call(b"ab") == b"ba"
        stream.close()
        server.close()
    asyncio.run(main())


def test_a_tls_client_never_sends_in_the_clear_to_a_plaintext_router(pki):
    async def main():
        accepted = []

        async def note(reader, writer):
            accepted.append(await reader.read(100))
            writer.close()

        plain = await asyncio.start_server(note, "127.0.0.1", 0)
        port = plain.sockets[0].getsockname()[1]
        with pytest.raises(rs.HandshakeError, match="not downgrading"):
            await rs.RouterStream.open(rs.StreamEndpoint("127.0.0.1", port, TOKEN),
                                       rs.EXCHANGE, 2.0, pki["tls"])
        await asyncio.sleep(0.05)
        assert accepted == []  # not even a connection
        plain.close()
    asyncio.run(main())


def test_client_and_fanout_use_a_tls_router_stream_and_fall_back_where_tls_differs(pki):
    routers = [StreamRouter()]
    routers[0].actor.set_stream_tls(pki["section"])
    routers[0].update_stats = _Method(routers[0], "update_stats")
    tls, plain = (RouterClient(1, heartbeat_s=0.05, handles=routers, tls=pki["tls"]),
                  RouterClient(1, heartbeat_s=0.05, handles=routers))

    async def main():
        for client in (tls, plain):
            assert all(isinstance(p, Placement)
                       for p in await asyncio.gather(*(place(client, i) for i in range(6))))
            await client.close()
        assert routers[0].calls["exchange"] == plain.counts["exchanges"] > 0  # actor calls
        fanout = RouterFanout(1, handles=routers, tls=pki["tls"], timeout_s=2.0)
        assert await fanout.push(prefill(rid="p1", stored=[1], snapshot=True)) is False
        assert routers[0].calls.get("update_stats", 0) == 0  # over the TLS stream
        fanout.close()
        assert routers[0].counters()["stream"] == {"tls": True, "exchange": 1, "stats": 1}
        ep = await routers[0].actor.endpoint()
        routers[0].actor.set_stream_tls(None)  # a deploy turned TLS off: a new stream
        assert (await routers[0].actor.endpoint()).port != ep.port
        stale = RouterFanout(1, handles=routers, tls=pki["tls"], timeout_s=2.0)
        assert await stale.push(prefill(rid="p1", stored=[2])) is False
        assert routers[0].calls["update_stats"] == 1  # no downgrade: an actor call
        stale.close()
        routers[0].actor._stream.close()

    asyncio.run(main())
    assert tls.counts["stream_exchanges"] == tls.counts["exchanges"] > 0
    assert plain.counts["stream_exchanges"] == 0
    assert routers[0].counters()["in_flight"] == {"m": 0}
