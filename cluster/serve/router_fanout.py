"""What a worker replica sends to every router actor: its stats pushes
(``StatsReport``) and its goodbye. Every router holds every replica's
stats and prefixes, so the standbys can take a model over at once.

Pushes travel over each router's stream (``router_stream``, kind
``STATS``: a Ray actor call per push cost the router 0.6 ms of CPU, a
frame on an open connection some 30 us) when the router offers one, else
as ``update_stats`` actor calls; a router whose stream cannot be opened
gets actor calls for ``router_link.STREAM_RETRY_S`` (as one whose TLS differs from the
replica's ``transfer.tls``: ``RouterStream.open``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from splitserve.cluster.serve.router_link import RouterLink
from splitserve.cluster.serve.router_names import NAMESPACE, router_name
from splitserve.cluster.serve.router_stream import STATS
from splitserve.handoff.tls import TLSConfig
from splitserve.router.reports import StatsReport, encode_report

log = logging.getLogger("splitserve.router_fanout")


class RouterFanout:
    """What a worker replica sends to every router: its stats pushes and its
    goodbye. A router that fails a push is looked up again next time."""

    def __init__(self, count: int, handles: list[Any] | None = None, stream: bool = True,
                 tls: TLSConfig | None = None, timeout_s: float = 5.0):
        """``count`` routers; ``handles``: their actors, else looked up by
        name; ``stream``: pushes over their streams, else actor calls only;
        ``tls``: the replica's ``transfer.tls``, which the streams are
        dialed with (and must offer); ``timeout_s``: the longest a push to
        one router may take (and its stream's endpoint call and opening)."""
        self._links = [RouterLink(i, handles[i] if handles is not None else None,
                                  use_stream=stream, call_timeout_s=timeout_s, tls=tls,
                                  kind=STATS)
                       for i in range(count)]
        self._missed = [False] * count  # a push to it failed since it last took one

    async def push(self, report: StatsReport) -> bool:
        """Push ``report`` to every router. Returns True when the next push
        must carry a snapshot of the prefix cache: a router did not know this
        replica, or took this push after missing some (not while it is down:
        a snapshot every period would cost every router). Raises only when
        every router failed."""

        encoded: list[bytes] = []  # encoded once, for every router with a stream

        async def one(link: RouterLink) -> bool:
            try:
                stream = await link.open_stream()
                if stream is None:
                    handle = await link.actor()
                    return await asyncio.wait_for(handle.update_stats.remote(report),
                                                  link.call_timeout_s)
                if not encoded:
                    encoded.append(encode_report(report))
                return await asyncio.wait_for(stream.call(encoded[0]),
                                              link.call_timeout_s) == b"\x01"
            except BaseException:
                link.lost()  # it may restart, listening anew: look it (and its stream) up again
                raise

        results = await asyncio.gather(*(one(link) for link in self._links),
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
        for link in self._links:
            try:
                handle = link.handle or ray.get_actor(router_name(link.index),
                                                      namespace=NAMESPACE)
                handle.remove_replica.remote(replica_id)
            except Exception:  # noqa: BLE001 - that router learns it from the missing pushes
                link.lost()

    def close(self) -> None:
        """Close the streams (the replica is going away)."""
        for link in self._links:
            link.drop_stream()
