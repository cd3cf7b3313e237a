"""Hostile HTTP clients against the OpenAI app on the ingress replicas' own
server (``endpoints.http_server: ingress``): the real app, API keys on, on a
real uvicorn on loopback, spoken to over raw sockets. Broken framing gets a
400 and an oversized head a 431, both in OpenAI's error shape with the
connection closed; valid but unusual framing (pipelining, HTTP/1.0, chunked
bodies with extensions and trailers, ``Expect: 100-continue``, a body past
the head's bound sent in one write with its head) is served;
two Authorization headers and a trailing slash are refused in OpenAI's
shape; and the server serves the next client after each, leaving no
connection or task behind."""

from __future__ import annotations

import asyncio
import json

import pytest

from splitserve.cluster.api.backend import LocalBackend
from splitserve.cluster.api.http_server import MAX_HEAD_BYTES, start_http_server
from splitserve.cluster.api.openai_api import build_http_app
from splitserve.cluster.api.prepare import PreparePool
from tests.unit.test_http_server import assert_nothing_held

KEY = "sk-hostile"
AUTH = f"Authorization: Bearer {KEY}\r\n"
BODY = b'{"model": "x", "prompt": "hi"}'
POST = f"POST /v1/completions HTTP/1.1\r\nHost: t\r\n{AUTH}Content-Type: application/json\r\n"
MODELS = f"GET /v1/models HTTP/1.1\r\nHost: t\r\n{AUTH}"


async def _exchange(port: int, data: bytes, idle_s: float = 0.5) -> tuple[bytes, bool]:
    """What the server answers to ``data``, and whether it closed the
    connection (else nothing more came for ``idle_s``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        writer.write(data)
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), idle_s)
            except asyncio.TimeoutError:
                return bytes(got), False
            except ConnectionResetError:  # closed with some of ``data`` unread
                return bytes(got), True
            if not chunk:
                return bytes(got), True
            got.extend(chunk)
    finally:
        writer.close()


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data`` (each with a Content-Length): status,
    headers, body."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
        n = int(headers.get("content-length", 0))
        status = int(lines[0].split()[1])
        if status == 100:  # an interim answer has no body
            n = 0
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def _error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def _serve(check):
    async def main():
        backend = LocalBackend({})
        app = build_http_app(backend, [KEY], 1 << 20, pool=PreparePool(1), body_timeout_s=5.0)
        server = await start_http_server(app, "127.0.0.1", 0)
        try:
            await check(server.port)
            # the server serves the next client
            (status, _, body), = _responses((await _exchange(
                server.port, f"{MODELS}Connection: close\r\n\r\n".encode()))[0])
            assert status == 200 and json.loads(body)["object"] == "list"
            # and nothing is left behind: no connection, no request task
            await assert_nothing_held(server)
        finally:
            await server.stop(grace=1.0)
            await backend.close()

    asyncio.run(main())


LONG_BODY = "a body longer than its Content-Length"
MALFORMED = {
    "chunk size not hex": (f"{POST}Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode() + BODY,
                           "Invalid character in chunk size"),
    "two Content-Lengths": (f"{POST}Content-Length: {len(BODY)}\r\nContent-Length: 3\r\n\r\n"
                            .encode() + BODY, "Duplicate Content-Length"),
    "negative Content-Length": (f"{POST}Content-Length: -1\r\n\r\n".encode() + BODY,
                                "Content-Length"),
    "Content-Length past 64 bits": (f"{POST}Content-Length: {'9' * 30}\r\n\r\n".encode(),
                                    "Content-Length overflow"),
    "Content-Length and chunked": (f"{POST}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
                                   f"\r\n{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n",
                                   "Transfer-Encoding"),
    # the bytes past it read as a request of their own, which cannot be framed
    LONG_BODY: (
        f"{POST}Content-Length: 13\r\n\r\n".encode() + BODY, "Invalid method"),
    "HTTP/2 prior knowledge": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00"
                               b"\x00\x00", "HTTP/2 is not served"),
    "a TLS ClientHello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
                          "Invalid method"),
    "an unknown HTTP version": (f"GET /v1/models HTTP/3.7\r\nHost: t\r\n{AUTH}\r\n".encode(),
                                "Invalid HTTP version"),
    "a NUL in a header": (f"{MODELS}X-A: a\x00b\r\n\r\n".encode(), "Invalid header value char"),
    "a folded header": (f"{MODELS}X-A: a\r\n b\r\n\r\n".encode(), ""),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_broken_framing_gets_a_400_in_openai_shape_and_the_connection_closes(name):
    data, reason = MALFORMED[name]

    async def check(port):
        got, closed = await _exchange(port, data)
        assert closed, got
        *before, (status, headers, body) = _responses(got)
        # a request framed before it is answered first, in order
        # (the 13 bytes of the long body's are not a JSON object: a 400 of its own)
        assert [s for s, _, _ in before] == ([400] if name == LONG_BODY else []), got
        assert status == 400 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        err = _error(body)
        assert err["code"] == "invalid_http_request" and err["type"] == "invalid_request_error"
        assert err["message"].startswith("malformed HTTP request") and reason in err["message"]

    _serve(check)


@pytest.mark.parametrize("head", [
    f"{MODELS}X-Big: {'b' * (MAX_HEAD_BYTES + 1)}\r\n\r\n",  # one huge header
    MODELS + "X-A: b\r\n" * (MAX_HEAD_BYTES // 8 + 1) + "\r\n",  # many small ones
    f"GET /v1/models?{'a' * (MAX_HEAD_BYTES + 1)} HTTP/1.1\r\nHost: t\r\n{AUTH}\r\n",  # long URL
], ids=["one huge header", "many headers", "a long URL"])
def test_a_head_over_the_bound_gets_a_431_and_the_connection_closes(head):
    async def check(port):
        got, closed = await _exchange(port, head.encode())
        assert closed
        (status, headers, body), = _responses(got)
        assert status == 431 and headers["connection"] == "close"
        err = _error(body)
        assert err["code"] == "request_header_too_large" and str(MAX_HEAD_BYTES) in err["message"]

    _serve(check)


def test_a_head_under_the_bound_is_served():
    async def check(port):
        head = f"{MODELS}X-Big: {'b' * (MAX_HEAD_BYTES // 2)}\r\n\r\n"
        (status, _, _), = _responses((await _exchange(port, head.encode()))[0])
        assert status == 200

    _serve(check)


BIG = json.dumps({"model": "x", "prompt": "a" * (3 * MAX_HEAD_BYTES)}).encode()


def test_unusual_but_valid_framing_is_served():
    chunked = f"{len(BODY):x}".encode()
    cases = {
        # three requests in one write: three answers, in order
        "pipelined": ((f"{POST}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY) * 2
                      + f"{MODELS}Connection: close\r\n\r\n".encode(), [404, 404, 200]),
        "HTTP/1.0, no keep-alive": (f"GET /v1/models HTTP/1.0\r\n{AUTH}\r\n".encode(), [200]),
        "chunked, an extension and a trailer": (
            f"{POST}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode() + chunked
            + b";ext=1\r\n" + BODY + b"\r\n0\r\nX-Trailer: 1\r\n\r\n", [404]),
        "Expect: 100-continue": (f"{POST}Expect: 100-continue\r\nContent-Length: {len(BODY)}\r\n"
                                 "Connection: close\r\n\r\n".encode() + BODY, [100, 404]),
        # a body past the head's bound, in the same write (and read) as its head
        "a large body in one write with its head": (
            f"{POST}Content-Length: {len(BIG)}\r\nConnection: close\r\n\r\n".encode() + BIG, [404]),
        "pipelined, the second with a large body": (
            f"{POST}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY
            + f"{POST}Content-Length: {len(BIG)}\r\nConnection: close\r\n\r\n".encode() + BIG,
            [404, 404]),
        "an absolute-form target": (f"GET http://elsewhere.example/v1/models HTTP/1.1\r\n"
                                    f"Host: t\r\n{AUTH}Connection: close\r\n\r\n".encode(), [200]),
    }

    async def check(port):
        for name, (data, statuses) in cases.items():
            got, closed = await _exchange(port, data)
            answers = _responses(got)
            assert [s for s, _, _ in answers] == statuses and closed, (name, got)
            for status, _, body in answers:
                if status == 404:  # the body was read whole: the model was looked up
                    assert _error(body)["code"] == "model_not_found", name

    _serve(check)


def test_two_authorization_headers_and_a_trailing_slash_are_refused():
    async def check(port):
        for first, second in ((KEY, "wrong"), ("wrong", KEY), (KEY, KEY)):
            data = (f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {first}\r\n"
                    f"Authorization: Bearer {second}\r\nConnection: close\r\n\r\n").encode()
            (status, headers, body), = _responses((await _exchange(port, data))[0])
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert _error(body)["message"] == "send one Authorization header, not 2"
        # no redirect to a URL built from the Host header: a 404 like any unknown path
        data = (f"{POST}Host: evil.example\r\nContent-Length: {len(BODY)}\r\n"
                "Connection: close\r\n\r\n").encode().replace(b"/v1/completions ",
                                                              b"/v1/completions/ ") + BODY
        (status, headers, body), = _responses((await _exchange(port, data))[0])
        assert status == 404 and "location" not in headers
        assert _error(body)["code"] == "unknown_route"
        # the scheme's case and the spaces around the key do not matter
        for auth in (f"bearer {KEY}", f"Bearer   {KEY}  "):
            data = (f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n"
                    "Connection: close\r\n\r\n").encode()
            assert _responses((await _exchange(port, data))[0])[0][0] == 200

    _serve(check)
