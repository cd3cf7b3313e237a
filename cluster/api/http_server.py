"""The OpenAI HTTP API served by the process that runs it, without Serve's
proxy (``endpoints.http_server: ingress``).

Each ingress replica runs uvicorn on the app ``build_http_app`` builds, on
the replica's own event loop, over a listening socket made here with
``SO_REUSEPORT``: the replicas on one node bind the same ``host:port`` and
the kernel spreads new connections over them, as for the gRPC API
(``start_grpc_server``). TLS when a certificate and key (PEM files) are
given. A connection's request head must arrive within ``head_timeout_s``
(the operator's ``endpoints.head_timeout_s``; ``HEAD_TIMEOUT_S`` by default)
of it opening or of its previous response (``HeadDeadlineProtocol``): idle
and slowloris connections do not hold descriptors indefinitely. A head
larger than ``MAX_HEAD_BYTES`` is refused (431) before more of it is read,
and a request the HTTP parser cannot frame (a malformed chunk size, two
Content-Lengths, an HTTP/2 preface) gets a 400; both in OpenAI's error
shape, and the connection is closed after them (its framing is lost).

Stopping (``DirectHttpServer.stop``): the listening socket is closed first,
so new connections go to the node's other replicas; idle keep-alive
connections are closed and busy ones closed once their response ends (a
closed connection with nothing left to send is aborted rather than left
waiting for the client's TLS close); the
in-flight responses (SSE streams included) run on for at most ``grace``
seconds, and those still running then are cancelled (their backend streams
close: the requests are cancelled and their KV blocks freed). A connection
the kernel had queued on the closed socket but the server not yet accepted
is reset: clients retry it (the ``openai`` client does, twice by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from splitserve.cluster.api.openai_schema import ApiError

log = logging.getLogger("splitserve.http")

BACKLOG = 2048
# a request's head (line and headers) must arrive within this of the
# connection opening or of its previous response ending (keep-alive idle)
HEAD_TIMEOUT_S = 30.0
# a request's line and headers together; the parser itself bounds neither
# the headers' count nor their size, so without this a client holds as much
# of the replica's memory as it sends within the head deadline
MAX_HEAD_BYTES = 64 * 1024
# a response's client must read: one that leaves the server's write buffer
# full (above its high-water mark) for this long is cut off
WRITE_STALL_S = 60.0


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that other processes of this
    user may bind too (``SO_REUSEPORT``). Raises OSError naming the address
    and the setting when it is taken by a socket without it (another server,
    e.g. Serve's proxy) or cannot be bound: the replica's constructor fails
    with it, and ``splitserve deploy`` shows Serve's last line of that."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        # the bare errno text ("Address already in use") names no address
        hint = (": another process holds it (free the port or set another "
                "endpoints.http_port)" if e.errno == errno.EADDRINUSE else "")
        raise OSError(e.errno, f"the OpenAI HTTP API cannot listen on {host}:{port} "
                      f"(endpoints.host / endpoints.http_port){hint}: {e.strerror}") from e
    return sock


class HeadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline and a size bound on each
    request's head, and its framing errors in OpenAI's shape.

    uvicorn bounds only the idle wait between requests, and its timer stops
    at the first byte that arrives: a connection that never sends a request,
    or sends its head a byte at a time, holds a file descriptor (and, over
    TLS, a handshaken session) for as long as its client likes, and enough
    of them run the replica out of descriptors. Here the head (request line
    and headers) must be complete within ``head_timeout_s`` of the
    connection opening or of the previous response ending; past it the
    connection is closed. The body has its own bound (``BodyDeadline``).

    The head may be at most ``MAX_HEAD_BYTES`` (counted as it arrives, so a
    head one byte over it is refused at the latest one read later; a body
    arriving in the same read as its head's end does not count): past it
    the answer is 431 ``request_header_too_large``. A request the parser
    rejects gets 400 ``invalid_http_request`` naming the parser's reason
    rather than uvicorn's plain-text 400. Both close the connection: what
    follows on it cannot be framed."""

    head_timeout_s = HEAD_TIMEOUT_S  # set per server by ``start_http_server``
    write_stall_s = WRITE_STALL_S  # likewise

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self._stall_timer = None
        # bytes received while a head is incomplete: from the connection's
        # start, and from each message's first byte to its headers' end
        self._in_head, self._head_bytes = True, 0
        self._refusal: ApiError | None = None  # answered once the responses before it are
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            room = MAX_HEAD_BYTES - self._head_bytes
            if len(data) > room:
                # one read may hold the head's end and the body after it: the
                # head's share is parsed first, and only a head that did not
                # end within it is refused (an end resets the count to 0)
                self._head_bytes = MAX_HEAD_BYTES
                super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self._head_bytes == MAX_HEAD_BYTES:
                    self._refuse(ApiError(431, f"the request line and headers exceed "
                                          f"{MAX_HEAD_BYTES} bytes", code="request_header_too_large"))
                    return
                self.data_received(data[room:])
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._cancel_head_deadline()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its ``except HttpParserError``: the
        # exception in hand names what the parser refused (a failed callback,
        # e.g. a URL too long to parse, carries its reason as the context)
        exc = sys.exc_info()[1]
        reason = exc.__context__ if exc is not None and exc.__context__ is not None else exc
        detail = f": {str(reason)[:200]}" if reason is not None and str(reason) else ""
        if self.parser.get_method() == b"PRI":  # llhttp's words for it: "Pause on PRI/Upgrade"
            detail = ": HTTP/2 is not served on this port; send HTTP/1.1"
        self._refuse(ApiError(400, f"malformed HTTP request{detail}",
                              code="invalid_http_request"))

    def _refuse(self, err: ApiError) -> None:
        """Answer ``err`` and close the connection. A request framed whole
        before the bad bytes is answered first (answers go in order:
        written now, this one would read as that request's answer), nothing
        more being read meanwhile; when the bad bytes are the body of the
        request in flight, that request is the one refused: its response
        cannot have begun (our routes answer after the whole body), or if
        it has, the connection is closed without a word."""
        if self.transport.is_closing() or self._refusal is not None:
            return
        cycle = self.cycle
        in_flight = cycle is not None and not cycle.response_complete
        if self.pipeline or (in_flight and not cycle.more_body):
            self._refusal = err
            self.flow.pause_reading()
            return
        if in_flight and cycle.response_started:
            self.transport.close()
            return
        body = json.dumps(err.body()).encode()
        self.transport.write(b"".join([
            STATUS_LINE[err.status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None:  # the requests before it are answered (``_refuse``)
            if (self.cycle is None or self.cycle.response_complete) and not self.pipeline:
                err, self._refusal = self._refusal, None
                self._refuse(err)
            return
        # the next head is awaited unless one is already queued (pipelined)
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_head_deadline()

    # A client that stops reading (a stream opened and never read) fills
    # the kernel's buffers, then the transport's; uvicorn then holds each
    # send until the buffer drains, which it never does: the connection,
    # the request's task and what the response holds (its backend streams,
    # their admission slots) would stay for as long as the client keeps the
    # connection open. The transport says when its buffer passes the
    # high-water mark and when it is back under the low one: a buffer that
    # stays full for ``write_stall_s`` aborts the connection, which ends the
    # response as a client disconnect does.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.write_stall_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._cancel_write_stall()
        super().resume_writing()

    def _cancel_write_stall(self) -> None:
        if getattr(self, "_stall_timer", None) is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        log.info("a client read nothing of its response for %g s: connection closed",
                 self.write_stall_s)
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        self._cancel_write_stall()
        super().connection_lost(exc)


def _protocol(head_timeout_s: float, write_stall_s: float) -> type[HeadDeadlineProtocol]:
    return type("HeadDeadline", (HeadDeadlineProtocol,),
                {"head_timeout_s": head_timeout_s, "write_stall_s": write_stall_s})


class _ReplicaServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process (a Ray worker) owns
    its signals, and the server is stopped by ``DirectHttpServer.stop``."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class DirectHttpServer:
    """uvicorn serving one ASGI app on a shared listening socket; build with
    ``start_http_server``."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, task: asyncio.Task):
        self._server, self._sock, self._task = server, sock, task
        self.port: int = sock.getsockname()[1]

    @property
    def serving(self) -> bool:
        return not self._task.done()

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight responses finish for at most
        ``grace`` seconds, cancel the rest; returns when the server is down."""
        if self._task.done():  # it ended on its own
            self._sock.close()
            return
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        reaper = asyncio.get_running_loop().create_task(self._reap_closed())
        try:
            # uvicorn bounds its own wait by ``grace``; the margin covers its
            # 0.1 s polling and the final socket close
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5.0)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        except Exception:  # noqa: BLE001 - a server that failed is down too
            log.exception("the HTTP server ended with an error")
        finally:
            reaper.cancel()
            self._sock.close()

    async def _reap_closed(self) -> None:
        """Abort each connection the server has closed that has nothing left
        to send: over TLS, closing waits for the client's close_notify (up to
        30 s), which an idle keep-alive client never sends, and uvicorn's
        drain waits for every connection to be gone."""
        while True:
            for conn in list(self._server.server_state.connections):
                t = getattr(conn, "transport", None)
                if t is not None and t.is_closing() and t.get_write_buffer_size() == 0:
                    t.abort()
            await asyncio.sleep(0.05)


async def start_http_server(app, host: str, port: int, tls_cert: str | None = None,
                            tls_key: str | None = None,
                            head_timeout_s: float = HEAD_TIMEOUT_S,
                            write_stall_s: float = WRITE_STALL_S) -> DirectHttpServer:
    """Serve ``app`` (ASGI) on ``host:port`` (0: a free port) from this
    event loop; returns once it accepts connections. A connection whose next
    request head has not arrived ``head_timeout_s`` after it opened or after
    its previous response is closed, and one whose client has read nothing of
    a response for ``write_stall_s`` aborted (``HeadDeadlineProtocol``). Raises
    OSError when the address cannot be bound, RuntimeError when the server
    fails to start."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both http_tls_cert and http_tls_key (PEM files), or neither")
    sock = listen_socket(host, port)
    config = uvicorn.Config(
        app, lifespan="off",  # the app has no startup work; Serve's copy runs none either
        ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level="warning", access_log=False,
        # the app answers every error in OpenAI's shape; uvicorn's own
        # date/server headers add nothing a client needs
        server_header=False, backlog=BACKLOG, timeout_keep_alive=head_timeout_s,
        http=_protocol(head_timeout_s, write_stall_s))
    server = _ReplicaServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            exc = task.exception() if not task.cancelled() else None
            raise RuntimeError(f"the HTTP server on {host}:{port} did not start: {exc!r}") from exc
        await asyncio.sleep(0.01)
    return DirectHttpServer(server, sock, task)
