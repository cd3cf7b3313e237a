"""One process's transport to one router actor: how an encoded exchange
(an ingress's; ``RouterClient`` decides what to send, and when, over one
``RouterLink`` per router) or a stats push (a worker replica's;
``RouterFanout``) gets there and its reply back.

An exchange goes over the router's stream (``router_stream``, kind
``EXCHANGE``) when the router offers one and it opens, else as an
``exchange`` actor call. A stream that cannot be opened (an older router
without one, a port the network blocks, TLS on one side only) leaves the
link on actor calls for ``STREAM_RETRY_S``, or until the router comes
back from being down (``lost``). A stream that breaks mid-exchange is
dropped and the exchange fails: the caller takes the router for down, as
for a failed actor call. The actor handle is looked up by name
(``router_names``) unless one was given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from splitserve.cluster.serve.router_names import NAMESPACE, router_name
from splitserve.cluster.serve.router_stream import EXCHANGE, STATS, RouterStream
from splitserve.handoff.tls import TLSConfig

log = logging.getLogger("splitserve.router_client")

# a router whose stream could not be opened gets actor calls; its stream is
# tried again after this long, or when it comes back from being down
STREAM_RETRY_S = 30.0


_KIND_NAMES = {EXCHANGE: "exchange", STATS: "stats"}


class RouterLink:
    """Router ``index``'s actor handle and stream, from one event loop
    (``start`` on each new one)."""

    def __init__(self, index: int, handle: Any | None, *, use_stream: bool,
                 call_timeout_s: float, tls: TLSConfig | None = None, kind: int = EXCHANGE):
        """``handle``: the router's actor, else looked up by name;
        ``use_stream``: calls over its stream when it offers one, else only
        actor calls; ``tls``: this process's TLS (``transfer.tls``), which
        the router's stream must match (``RouterStream.open``); ``kind``:
        what the stream carries (``EXCHANGE`` or ``STATS``)."""
        self.index = index
        self.kind = kind
        self.handle = handle
        self._named = handle is None
        self.use_stream = use_stream
        self.call_timeout_s = call_timeout_s
        self.tls = tls
        self.stream: RouterStream | None = None  # exchanges go here when open
        self.stream_retry_at = 0.0  # monotonic: no stream before then (actor calls)
        self._opening: asyncio.Lock | None = None  # one stream opened at a time

    def start(self) -> None:
        """On a new event loop: the old loop's stream ended with it."""
        self.stream = None
        self._opening = asyncio.Lock()

    async def actor(self) -> Any:
        """The router's actor handle (looked up by name the first time)."""
        if self.handle is None and self._named:
            import ray

            self.handle = await asyncio.to_thread(ray.get_actor, router_name(self.index),
                                                  namespace=NAMESPACE)
        return self.handle

    async def exchange(self, data: bytes) -> tuple[bytes, bool]:
        """Send one encoded exchange; its encoded reply, and whether it came
        over the stream. Raises what the stream or the actor call raised
        (a timeout after ``call_timeout_s``)."""
        stream = await self.open_stream()
        if stream is None:
            handle = await self.actor()
            return await asyncio.wait_for(handle.exchange.remote(data), self.call_timeout_s), False
        # a break here is a failed call: the router is taken for down
        # (probed again, the stream reopened, within a heartbeat)
        try:
            return await asyncio.wait_for(stream.call(data), self.call_timeout_s), True
        except BaseException:
            self.drop_stream()
            raise

    async def poll(self, holder: str, wait_s: float) -> bytes:
        """``holder``'s decided requests (encoded, ``exchange_codec.encode_resolved``),
        as the router's ``poll`` actor call answers them within ``wait_s``."""
        handle = await self.actor()
        return await asyncio.wait_for(handle.poll.remote(holder, wait_s, True),
                                      wait_s + self.call_timeout_s)

    async def open_stream(self) -> RouterStream | None:
        """The open stream, opened if due; None: actor calls (streams are
        off, or the last try failed less than STREAM_RETRY_S ago)."""
        if self.stream is not None and not self.stream.closed:
            return self.stream
        if not self.use_stream or time.monotonic() < self.stream_retry_at:
            return None
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.stream is not None and not self.stream.closed:
                return self.stream
            try:
                handle = await self.actor()
                endpoint = await asyncio.wait_for(handle.endpoint.remote(), self.call_timeout_s)
                self.stream = await RouterStream.open(endpoint, self.kind, self.call_timeout_s,
                                                      self.tls)
            except Exception as e:  # noqa: BLE001 - actor calls still work (or fail on their own)
                log.info("router %d: no %s stream (%r); actor calls for %.0f s",
                         self.index, _KIND_NAMES[self.kind], e, STREAM_RETRY_S)
                self.stream = None
                self.stream_retry_at = time.monotonic() + STREAM_RETRY_S
        return self.stream

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def retry_stream(self) -> None:
        """Try the stream again at the next exchange (the router is down: when
        it is back it may listen elsewhere)."""
        self.stream_retry_at = 0.0

    def lost(self) -> None:
        """The router failed: look it up again (unless its handle was
        given), and its stream with it."""
        if self._named:
            self.handle = None
        self.drop_stream()
        self.retry_stream()
