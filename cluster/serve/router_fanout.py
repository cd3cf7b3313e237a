"""What a worker replica sends to every router actor: its stats pushes
(``StatsReport``) and its goodbye. Every router holds every replica's
stats and prefixes, so the standbys can take a model over at once.

Pushes travel over each router's stream (``router_stream``, kind
``STATS``: a Ray actor call per push cost the router 0.6 ms of CPU, a
frame on an open connection some 30 us) when the router offers one, else
as ``update_stats`` actor calls; a router whose stream cannot be opened
gets actor calls for ``STREAM_RETRY_S`` (as one whose TLS differs from the
replica's ``transfer.tls``: ``RouterStream.open``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from splitserve.cluster.serve.router_link import STREAM_RETRY_S
from splitserve.cluster.serve.router_names import NAMESPACE, router_name
from splitserve.cluster.serve.router_stream import STATS, RouterStream
from splitserve.handoff.tls import TLSConfig
from splitserve.router.reports import StatsReport, encode_report

log = logging.getLogger("splitserve.router_fanout")


class RouterFanout:
    """What a worker replica sends to every router: its stats pushes and its
    goodbye. A router that fails a push is looked up again next time."""

    def __init__(self, count: int, handles: list[Any] | None = None, stream: bool = True,
                 tls: TLSConfig | None = None):
        """``count`` routers; ``handles``: their actors, else looked up by
        name; ``stream``: pushes over their streams, else actor calls only;
        ``tls``: the replica's ``transfer.tls``, which the streams are
        dialed with (and must offer)."""
        self._tls = tls
        self._given = handles
        self._handles: list[Any] = list(handles) if handles is not None else [None] * count
        self._missed = [False] * count  # a push to it failed since it last took one
        self._use_stream = stream
        self._streams: list[RouterStream | None] = [None] * count
        self._stream_retry_at = [0.0] * count  # monotonic: actor calls until then

    def _handle(self, i: int):
        if self._handles[i] is None:
            self._handles[i] = ray.get_actor(router_name(i), namespace=NAMESPACE)
        return self._handles[i]

    def _forget(self, i: int) -> None:
        """Router ``i`` failed a push: look it up (and its stream) again."""
        if self._given is None:
            self._handles[i] = None
        stream, self._streams[i] = self._streams[i], None
        if stream is not None:
            stream.close()
        self._stream_retry_at[i] = 0.0  # it may restart, listening anew: ask it again

    async def _stream(self, i: int, timeout_s: float) -> RouterStream | None:
        stream = self._streams[i]
        if stream is not None and not stream.closed:
            return stream
        if not self._use_stream or time.monotonic() < self._stream_retry_at[i]:
            return None
        try:
            endpoint = await asyncio.wait_for(self._handle(i).endpoint.remote(), timeout_s)
            self._streams[i] = await RouterStream.open(endpoint, STATS, timeout_s, self._tls)
        except Exception as e:  # noqa: BLE001 - actor calls still work (or fail on their own)
            log.info("router %d: no stream for stats pushes (%r); actor calls for %.0f s",
                     i, e, STREAM_RETRY_S)
            self._stream_retry_at[i] = time.monotonic() + STREAM_RETRY_S
        return self._streams[i]

    async def push(self, report: StatsReport, timeout_s: float) -> bool:
        """Push ``report`` to every router. Returns True when the next push
        must carry a snapshot of the prefix cache: a router did not know this
        replica, or took this push after missing some (not while it is down:
        a snapshot every period would cost every router). Raises only when
        every router failed."""

        encoded: list[bytes] = []  # encoded once, for every router with a stream

        async def one(i: int) -> bool:
            try:
                stream = await self._stream(i, timeout_s)
                if stream is None:
                    return await asyncio.wait_for(self._handle(i).update_stats.remote(report),
                                                  timeout_s)
                if not encoded:
                    encoded.append(encode_report(report))
                return await asyncio.wait_for(stream.call(encoded[0]), timeout_s) == b"\x01"
            except BaseException:
                self._forget(i)
                raise

        results = await asyncio.gather(*(one(i) for i in range(len(self._handles))),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        snapshot = False
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                self._missed[i] = True
            else:
                snapshot = snapshot or r is True or self._missed[i]
                self._missed[i] = False
        return snapshot

    def remove_replica(self, replica_id: str) -> None:
        """Tell every router this replica is leaving (fire and forget)."""
        for i in range(len(self._handles)):
            try:
                self._handle(i).remove_replica.remote(replica_id)
            except Exception:  # noqa: BLE001 - that router learns it from the missing pushes
                self._forget(i)

    def close(self) -> None:
        """Close the streams (the replica is going away)."""
        for i in range(len(self._streams)):
            stream, self._streams[i] = self._streams[i], None
            if stream is not None:
                stream.close()
