"""The OpenAI HTTP API's own server (``endpoints.http_server: ingress``):
real uvicorn servers on loopback sharing one port; a stopped one stops
accepting while its in-flight streams finish, within its grace, and the
other keeps the port; HTTPS with the configured certificate."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from splitserve.cluster.api.http_server import listen_socket, start_http_server
from tests.fixtures.ports import free_port
from tests.unit.tls_certs import CA


def app_named(name: str, chunk_gap_s: float = 0.05) -> Starlette:
    async def who(_request):
        return PlainTextResponse(name)

    async def stream(request):
        n = int(request.query_params["n"])

        async def chunks():
            for i in range(n):
                yield f"{name}:{i}\n"
                await asyncio.sleep(chunk_gap_s)

        return StreamingResponse(chunks(), media_type="text/plain")

    return Starlette(routes=[Route("/who", who), Route("/stream", stream)])


def fresh_connections(timeout: float = 10) -> httpx.AsyncClient:
    """A client that opens a new connection for every request."""
    return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))


async def _whos(port: int, n: int) -> set[str]:
    """Who answered ``n`` requests, each on a new connection."""
    async with fresh_connections() as c:
        return {(await c.get(f"http://127.0.0.1:{port}/who")).text for _ in range(n)}


def test_two_servers_share_a_port_and_a_stopped_one_finishes_its_streams():
    port = free_port()

    async def main():
        a = await start_http_server(app_named("a"), "127.0.0.1", port)
        b = await start_http_server(app_named("b"), "127.0.0.1", port)
        assert a.port == b.port == port
        assert await _whos(port, 40) == {"a", "b"}  # the kernel spreads connections
        # a stream on each server, then stop ``a`` while its stream runs
        async with fresh_connections() as c:
            streams = {}

            async def read():
                async with c.stream("GET", f"http://127.0.0.1:{port}/stream?n=10") as r:
                    lines = [ln async for ln in r.aiter_lines()]
                streams.setdefault(lines[0].split(":")[0], []).append(lines)

            # one connection each: both servers get some
            tasks = [asyncio.ensure_future(read()) for _ in range(16)]
            await asyncio.sleep(0.2)  # every stream started
            await a.stop(grace=10.0)
            assert not a.serving
            await asyncio.gather(*tasks)
            # every stream of the stopped server ran to its end
            assert set(streams) == {"a", "b"}
            for name, runs in streams.items():
                for lines in runs:
                    assert lines == [f"{name}:{i}" for i in range(10)]
            # the port is the other server's now
            assert await _whos(port, 10) == {"b"}
            assert (await c.get(f"http://127.0.0.1:{port}/who")).text == "b"
        await b.stop(grace=1.0)
        with pytest.raises(httpx.ConnectError):
            async with fresh_connections(2) as c:
                await c.get(f"http://127.0.0.1:{port}/who")

    asyncio.run(main())


def test_a_stream_longer_than_the_grace_is_cut_and_the_stop_is_bounded():
    port = free_port()

    async def main():
        s = await start_http_server(app_named("a", chunk_gap_s=0.1), "127.0.0.1", port)
        got: list[str] = []

        async def read():
            async with httpx.AsyncClient(timeout=10) as c:
                async with c.stream("GET", f"http://127.0.0.1:{port}/stream?n=1000") as r:
                    async for ln in r.aiter_lines():
                        got.append(ln)

        t = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await s.stop(grace=0.5)
        assert loop.time() - t0 < 2.0
        with pytest.raises(httpx.HTTPError):  # cut: the body ends early
            await t
        assert 0 < len(got) < 1000

    asyncio.run(main())


def test_https_with_the_configured_certificate(tmp_path):
    ca = CA()
    cert, key = ca.issue("ingress.splitserve.test", ips=("127.0.0.1",)).write(tmp_path, "srv")
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    port = free_port()

    async def main():
        s = await start_http_server(app_named("tls"), "127.0.0.1", port, cert, key)
        async with httpx.AsyncClient(timeout=5) as c:  # plaintext: no answer
            with pytest.raises(httpx.HTTPError):
                await c.get(f"http://127.0.0.1:{port}/who")
        # a keep-alive client left idle, one whose stream runs when the server stops
        idle = httpx.AsyncClient(verify=str(tmp_path / "ca.crt"), timeout=5)
        busy = httpx.AsyncClient(verify=str(tmp_path / "ca.crt"), timeout=5)
        try:
            assert (await idle.get(f"https://127.0.0.1:{port}/who")).text == "tls"

            async def read():
                async with busy.stream("GET", f"https://127.0.0.1:{port}/stream?n=10") as r:
                    return [ln async for ln in r.aiter_lines()]

            t = asyncio.ensure_future(read())
            await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await s.stop(grace=10.0)
            # the stream ran to its end; the idle client's TLS close, never
            # answered, did not hold the stop to its grace
            assert await t == [f"tls:{i}" for i in range(10)]
            assert loop.time() - t0 < 2.0
        finally:
            await idle.aclose()
            await busy.aclose()

    asyncio.run(main())


def test_a_port_held_without_reuseport_is_refused():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*another "
                                          r"process holds it.*endpoints\.http_port") as e:
            listen_socket("127.0.0.1", port)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        holder.close()
    with pytest.raises(ValueError, match="http_tls_key"):
        asyncio.run(start_http_server(app_named("x"), "127.0.0.1", 0, tls_cert="/c.pem"))


def _closed_after(sock: socket.socket, send: bytes = b"", drip_s: float = 0.0) -> float:
    """Seconds until the server closes ``sock``, sending ``send`` a byte
    every ``drip_s`` (all at once when 0) meanwhile; reads what it answers."""
    t0 = time.monotonic()
    sock.settimeout(0.05 if drip_s else 10)
    for i in range(len(send)):
        if not drip_s:
            sock.sendall(send)
            break
        try:
            sock.sendall(send[i:i + 1])
            if sock.recv(65536) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            time.sleep(drip_s)
        except OSError:
            return time.monotonic() - t0
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return time.monotonic() - t0


def test_a_connection_without_a_request_head_in_time_is_closed(tmp_path):
    port = free_port()
    ca = CA()
    cert, key = ca.issue("ingress.splitserve.test", ips=("127.0.0.1",)).write(tmp_path, "srv")
    (tmp_path / "ca.crt").write_bytes(ca.cert)
    tls_port = free_port()
    head = b"GET /stream?n=12 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"

    async def main():
        s = await start_http_server(app_named("a"), "127.0.0.1", port, head_timeout_s=0.4)
        t = await start_http_server(app_named("t"), "127.0.0.1", tls_port, cert, key,
                                    head_timeout_s=0.4)
        try:
            def idle():  # a connection that sends nothing
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    return _closed_after(sock)

            def drip():  # one that sends its head a byte at a time
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    return _closed_after(sock, head, drip_s=0.05)

            def idle_tls():  # over TLS, once handshaken
                ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port)),
                                     server_hostname="127.0.0.1") as sock:
                    return _closed_after(sock)

            for took in await asyncio.gather(*(asyncio.to_thread(f)
                                               for f in (idle, drip, idle_tls))):
                assert 0.3 < took < 2.0
            # a request in time is served, its stream (longer than the
            # deadline) runs to its end, and the kept-alive connection idle
            # after it is closed by the same deadline
            async with httpx.AsyncClient(timeout=10) as c:
                async with c.stream("GET", f"http://127.0.0.1:{port}/stream?n=12") as r:
                    assert [ln async for ln in r.aiter_lines()] == [f"a:{i}" for i in range(12)]
                assert len(s._server.server_state.connections) == 1
                await asyncio.sleep(0.8)
                assert not s._server.server_state.connections
                assert (await c.get(f"http://127.0.0.1:{port}/who")).text == "a"  # reconnects
        finally:
            await s.stop(grace=1.0)
            await t.stop(grace=1.0)

    asyncio.run(main())


def test_a_client_that_never_reads_its_stream_is_cut_off_without_blocking_others():
    """A stream whose client never reads: what the server holds for it is
    bounded (it waits for the buffers to drain rather than producing on),
    other clients are served meanwhile, and once its buffer has stayed full
    for ``write_stall_s`` the connection is aborted and the response's
    generator closed, as when a client goes away."""
    port = free_port()
    produced, closed = [0], asyncio.Event()
    chunk = b"x" * 65536

    async def flood(_request):
        async def chunks():
            try:
                while True:
                    produced[0] += len(chunk)
                    yield chunk
                    await asyncio.sleep(0)  # sends to a gone client return at once
            finally:
                closed.set()

        return StreamingResponse(chunks(), media_type="text/plain")

    async def who(_request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/flood", flood), Route("/who", who)])

    async def main():
        s = await start_http_server(app, "127.0.0.1", port, write_stall_s=1.0)
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, hold little
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.sleep(0.5)
            stalled_at = produced[0]
            async with httpx.AsyncClient(timeout=5) as c:  # others are served meanwhile
                assert (await c.get(f"http://127.0.0.1:{port}/who")).text == "ok"
            await asyncio.sleep(0.3)
            # the generator waits for the client: nothing more was produced
            # (the kernel's buffers and the transport's high-water mark hold it)
            assert produced[0] == stalled_at < 64 << 20, (stalled_at, produced[0])
            await asyncio.wait_for(closed.wait(), 5.0)  # cut off: the generator was closed
            assert 1.0 <= loop.time() - t0 < 4.0
            await assert_nothing_held(s)
            sock.close()
        finally:
            await s.stop(grace=1.0)

    asyncio.run(main())


async def assert_nothing_held(server) -> None:
    """Within a second: no connection and no request task left on ``server``."""
    state = server._server.server_state
    for _ in range(100):
        if not state.connections and not state.tasks:
            break
        await asyncio.sleep(0.01)
    assert not state.connections and not state.tasks
