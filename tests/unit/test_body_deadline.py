"""A request body that never finishes (``endpoints.body_timeout_s``): the
real OpenAI app on a real uvicorn (the ingress replicas' server) on
loopback, fed over raw sockets; the stalled request gets a 408 in OpenAI's
shape, its connection is closed, and no connection or task stays behind."""

from __future__ import annotations

import asyncio
import json
import time

from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.http_server import start_http_server
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.prepare import PreparePool
from splitserve.cluster.config.access import EndpointSpec
from tests.unit.test_http_server import assert_nothing_held

TIMEOUT_S = 0.3
HEAD = "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


async def _exchange(port: int, parts: list[bytes], gap_s: float = 0.0) -> tuple[bytes, float]:
    """Everything the server sends on one connection until it closes it,
    while ``parts`` are sent ``gap_s`` apart (those after it closed are
    not); and how long that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    got = bytearray()

    async def read_to_eof():
        while chunk := await reader.read(65536):
            got.extend(chunk)

    reading = asyncio.ensure_future(read_to_eof())
    try:
        for part in parts:
            if reading.done():  # answered and closed: the rest is never read
                break
            writer.write(part)
            await asyncio.sleep(gap_s)
        await asyncio.wait_for(reading, 5.0)
        return bytes(got), time.monotonic() - t0
    finally:
        reading.cancel()
        writer.close()


def _status_and_body(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(ln.lower().split(": ", 1) for ln in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def _serve(check):
    async def main():
        backend = LocalBackend({})
        app = build_http_app(backend, [], 1 << 20, pool=PreparePool(1), body_timeout_s=TIMEOUT_S)
        server = await start_http_server(app, "127.0.0.1", 0)
        try:
            await check(server.port)
            # nothing left behind: no connection, no request task
            await assert_nothing_held(server)
        finally:
            await server.stop(grace=1.0)
            await backend.close()

    asyncio.run(main())


def _assert_timed_out(data: bytes, took: float) -> None:
    status, headers, body = _status_and_body(data)
    assert status == 408 and headers["connection"] == "close"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error"
    assert "endpoints.body_timeout_s" in err["message"] and "0.3 s" in err["message"]
    # timers may fire a little early (0.99998 s seen for 1 s): a small margin
    assert TIMEOUT_S - 0.05 <= took < TIMEOUT_S + 1.5


def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_closes():
    async def check(port):
        data, took = await _exchange(port, [f"{HEAD}Content-Length: 1000\r\n\r\n".encode()
                                            + b'{"model": '])
        _assert_timed_out(data, took)

    _serve(check)


def test_a_chunked_body_that_stops_gets_408():
    async def check(port):
        data, took = await _exchange(port, [f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
                                            + b'a\r\n{"model": \r\n'])
        _assert_timed_out(data, took)

    _serve(check)


def test_the_deadline_bounds_the_whole_body_not_each_piece():
    # every piece comes well within the timeout; the body as a whole does not
    async def check(port):
        pieces = [f"{HEAD}Content-Length: 1000\r\n\r\n".encode()] + [b" "] * 20
        data, took = await _exchange(port, pieces, gap_s=0.05)
        _assert_timed_out(data, took)

    _serve(check)


def test_a_body_that_arrives_in_time_is_read_and_the_connection_kept():
    async def check(port):
        body = json.dumps({"model": "nope", "prompt": "hi"}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):  # two requests on one keep-alive connection
                # the body comes in two pieces, both within the deadline
                writer.write(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
                await writer.drain()
                await asyncio.sleep(TIMEOUT_S / 3)
                writer.write(body[5:])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
                status, headers, _ = _status_and_body(head + b"{}")
                await reader.readexactly(int(headers["content-length"]))
                assert status == 404  # read, parsed and answered: no such model
                assert headers.get("connection") != "close"
            # the deadline covers each request's body only: a connection
            # idle past it between requests is still served
            await asyncio.sleep(TIMEOUT_S * 1.5)
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            assert head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    _serve(check)


def test_the_setting_defaults_to_30_seconds_and_is_bounded():
    assert EndpointSpec().body_timeout_s == 30.0
    for bad in (0, -1, 4000):
        try:
            EndpointSpec(body_timeout_s=bad)
        except ValueError:
            continue
        raise AssertionError(f"body_timeout_s={bad} was accepted")
