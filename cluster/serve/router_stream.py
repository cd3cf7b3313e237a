"""Router streams: an ingress's exchanges with a router actor, and a worker
replica's stats pushes to it, over one TCP connection each instead of one
Ray actor call per message.

A Ray actor call costs the router 0.6 to 1.3 ms of CPU whatever it carries
(its task machinery, the hand-over between Ray's thread and the actor's
event loop), against about 60 us per placement: at 32 requests per
exchange that was a third of the router's time, and every replica's push
every stats period another tenth. A framed round trip on an open
connection costs it about 30 us. So each router actor also listens on a
TCP port of its node (``RouterStreamServer``); ``RouterClient`` sends its
exchanges there and ``RouterFanout`` its pushes (``RouterStream``), the
same msgpack bytes (``splitserve.router.exchange_codec``, a
``StatsReport`` for a push) as the actor calls would carry. Polls,
goodbyes and operator queries stay Ray calls.

Authenticated: the router draws a random token (``TOKEN_BYTES``) when it
starts listening and hands it out only through its actor method
``endpoint`` (Ray's own channel); a connection must open with it (the
hello) before anything it sends is read as an exchange, and one that does
not is closed without an answer. An exchange carries request ids, model
names, prompt lengths and block hashes, never a prompt's text.

Encrypted when the operator configures TLS for the internal planes
(``transfer.tls``, one ``splitserve.handoff.tls.TLSConfig`` for them all):
the router then serves TLS (mutual when ``mutual`` is set, as the worker
RPC plane), says so in its endpoint (``StreamEndpoint.tls``), and the
token check runs inside it. A client dials TLS exactly when the endpoint
says so and it has TLS itself, verifying the router against the CA: one
without TLS cannot reach a TLS router, and one with TLS refuses a
plaintext router rather than send its token and exchanges in the clear
(``HandshakeError`` either way: the caller keeps to actor calls). A
connection's TLS handshake and its hello each have ``HELLO_TIMEOUT_S``,
so a peer that connects and stalls holds nothing for longer. Without
``transfer.tls`` the bytes are not encrypted, as Ray's own calls between
workers are not unless Ray's TLS is on.

Wire, version ``VERSION``:

  client -> router  hello: MAGIC (4 bytes) | version (1 byte) | kind (1 byte) | token
  router -> client  MAGIC | version            (the token matched)
  then, in turn     frame: length (4 bytes, big-endian) | that many bytes

one reply frame per request frame, in order; ``kind`` says what every
frame of the connection is (``EXCHANGE``: an exchange, answered with its
reply; ``STATS``: a stats push, answered with one byte, 1 when the router
needs a snapshot of the replica's cache). A frame over
``MAX_FRAME_BYTES``, a wrong hello or a request the router cannot decode
ends the connection; the client takes any break as it takes a failed
actor call (``RouterClient`` marks the router down and probes it again).
A router of another version answers the hello with its own version and
closes; the client then keeps to actor calls.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import struct
from dataclasses import dataclass
from typing import Callable, Mapping

from splitserve.handoff import tls as tls_
from splitserve.handoff.tls import TLSConfig

log = logging.getLogger("splitserve.router_stream")

MAGIC = b"SSRX"
VERSION = 1
EXCHANGE, STATS = 1, 2  # what a connection carries (the hello's kind)
TOKEN_BYTES = 32
HELLO_BYTES = len(MAGIC) + 2 + TOKEN_BYTES
MAX_FRAME_BYTES = 64 << 20  # an exchange of 512 calls of 64k-token prompts is ~16 MiB
# a connection that does not finish its TLS handshake, then its hello, in
# this long (each) is closed
HELLO_TIMEOUT_S = 5.0
_LEN = struct.Struct(">I")


class StreamError(ConnectionError):
    """The router stream broke or the peer does not speak it."""


class HandshakeError(StreamError):
    """The hello was not this protocol, this version, or this router's token."""


class FrameTooLargeError(StreamError):
    """A frame's length is over ``MAX_FRAME_BYTES``."""


@dataclass(frozen=True, slots=True)
class StreamEndpoint:
    """Where a router listens for exchanges, and the token it expects."""

    host: str
    port: int
    token: bytes
    version: int = VERSION
    tls: bool = False  # the router serves TLS only (``transfer.tls``)


def hello(token: bytes, kind: int) -> bytes:
    """The client's first bytes."""
    if len(token) != TOKEN_BYTES:
        raise HandshakeError(f"a stream token is {TOKEN_BYTES} bytes, got {len(token)}")
    return MAGIC + bytes((VERSION, kind)) + token


def check_hello(data: bytes, token: bytes) -> int:
    """The connection's kind; raises HandshakeError unless ``data`` is
    ``hello(token, kind)``. The kind is the server's to check."""
    if len(data) != HELLO_BYTES or data[:len(MAGIC)] != MAGIC:
        raise HandshakeError("not a router stream hello")
    if data[len(MAGIC)] != VERSION:
        raise HandshakeError(f"router stream version {data[len(MAGIC)]}, this router speaks "
                             f"{VERSION}")
    if not hmac.compare_digest(data[len(MAGIC) + 2:], token):
        raise HandshakeError("wrong router stream token")
    return data[len(MAGIC) + 1]


def frame(payload: bytes) -> bytes:
    """``payload`` with its length in front."""
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameTooLargeError(f"frame of {len(payload)} bytes; the limit is {MAX_FRAME_BYTES}")
    return _LEN.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """The next frame's payload. Raises FrameTooLargeError (the length is
    over ``max_bytes``: nothing more is read) or StreamError (the stream
    ended, at a frame's start or inside it)."""
    try:
        (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if n > max_bytes:
            raise FrameTooLargeError(f"frame of {n} bytes announced; the limit is {max_bytes}")
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise StreamError(f"router stream ended ({len(e.partial)} bytes of "
                          f"{e.expected} read)") from None


class RouterStreamServer:
    """The router's side: answers each frame of a connection of kind k with
    ``answers[k](frame)`` on the event loop that started it (the router
    actor's, where every other method of the router runs, so its state is
    still changed by one call at a time)."""

    def __init__(self, answers: Mapping[int, Callable[[bytes], bytes]], host: str,
                 tls: TLSConfig | None = None, hello_timeout_s: float = HELLO_TIMEOUT_S):
        """``tls``: serve TLS only, with this certificate (and, under mutual
        TLS, require clients' certificates signed by its CA)."""
        self._answers = dict(answers)
        self._host = host
        self._tls = tls
        self._hello_timeout_s = hello_timeout_s
        self._server: asyncio.base_events.Server | None = None
        self._endpoint: StreamEndpoint | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted: dict[int, int] = {}  # kind -> connections that passed the hello
        self._starting: asyncio.Lock | None = None

    async def start(self) -> StreamEndpoint:
        """Listen (once) on a free port of ``host``; the endpoint to hand out."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # calls that overlap get the one endpoint
            return await self._start()

    async def _start(self) -> StreamEndpoint:
        if self._endpoint is None:
            ssl = None if self._tls is None else tls_.server_ssl_context(self._tls)
            # a handshake that stalls ends the connection (asyncio closes it)
            self._server = await asyncio.start_server(
                self._serve, self._host, 0, ssl=ssl,
                ssl_handshake_timeout=None if ssl is None else self._hello_timeout_s)
            port = self._server.sockets[0].getsockname()[1]
            self._endpoint = StreamEndpoint(self._host, port, secrets.token_bytes(TOKEN_BYTES),
                                            tls=ssl is not None)
        return self._endpoint

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._writers.add(writer)
        try:
            data = await asyncio.wait_for(reader.readexactly(HELLO_BYTES),
                                          self._hello_timeout_s)
            try:
                kind = check_hello(data, self._endpoint.token)
                answer = self._answers.get(kind)
                if answer is None:
                    raise HandshakeError(f"no router stream of kind {kind}")
            except HandshakeError as e:
                log.warning("router stream from %s refused: %s", peer, e)
                if data[:len(MAGIC)] == MAGIC and data[len(MAGIC)] != VERSION:
                    # another version: say which this is (no token was checked)
                    writer.write(MAGIC + bytes((VERSION,)))
                return
            writer.write(MAGIC + bytes((VERSION,)))
            self.accepted[kind] = self.accepted.get(kind, 0) + 1
            while True:
                request = await read_frame(reader)
                writer.write(frame(answer(request)))
                if writer.transport.get_write_buffer_size() > MAX_FRAME_BYTES:
                    await writer.drain()  # a client that sends without reading waits
        except (StreamError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass  # the client went away (or never said hello): nothing to answer
        except Exception:  # noqa: BLE001 - a request the router cannot take ends its stream
            log.exception("router stream from %s: request failed; closing it", peer)
        finally:
            self._writers.discard(writer)
            writer.close()

    @property
    def started(self) -> bool:
        return self._endpoint is not None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in tuple(self._writers):
            w.close()


class RouterStream:
    """The client's side: one connection to one router, one request at a
    time (``call`` holds a lock from its frame out to its reply in)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def open(cls, endpoint: StreamEndpoint, kind: int, timeout_s: float,
                   tls: TLSConfig | None = None) -> RouterStream:
        """Connect (over TLS with ``tls``, which must match the endpoint's
        ``tls``) and say hello; raises HandshakeError when the router does
        not answer it in kind or TLS does not match, ssl.SSLError when the
        router's certificate does not verify, OSError / TimeoutError when
        unreachable."""
        if endpoint.version != VERSION:
            raise HandshakeError(f"the router speaks router stream version {endpoint.version}, "
                                 f"this client {VERSION}")
        if endpoint.tls and tls is None:
            raise HandshakeError("the router's stream is TLS only and this process has no TLS "
                                 "configured (transfer.tls)")
        if tls is not None and not endpoint.tls:
            # never the token and exchanges in the clear where TLS is configured
            raise HandshakeError("the router's stream is plaintext and this process is "
                                 "configured for TLS (transfer.tls): not downgrading")
        ssl = None
        if tls is not None:
            ssl = dict(ssl=tls_.client_ssl_context(tls), ssl_handshake_timeout=timeout_s,
                       server_hostname=tls_.server_hostname(tls, endpoint.host))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, **(ssl or {})), timeout_s)
        try:
            writer.write(hello(endpoint.token, kind))
            try:
                answer = await asyncio.wait_for(reader.readexactly(len(MAGIC) + 1), timeout_s)
            except asyncio.IncompleteReadError as e:
                raise HandshakeError("the router closed the stream at its hello (a wrong "
                                     f"token?) after {len(e.partial)} bytes") from None
            if answer != MAGIC + bytes((VERSION,)):
                raise HandshakeError(f"the router answered the hello with {answer!r}")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def call(self, payload: bytes) -> bytes:
        """Send one frame and return the reply's payload. Any failure
        (including cancellation mid-call) closes the stream: a reply may
        still be on its way, and the next call must not read it."""
        if self.closed:
            raise StreamError("router stream is closed")
        async with self._lock:
            try:
                self._writer.write(frame(payload))
                return await read_frame(self._reader)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
