"""Placements a replica's pushed stats cannot show yet.

A replica reads its stats (``updated_at``, its wall clock) and pushes them;
a placement the router made on it after that moment cannot be in them.
Between pushes RouterCore counts each placement against its replicas
(``RouterConfig.optimistic_updates``), and a push replaces those counts
with the replica's own numbers. A push that left before a placement would
then reopen the seat and the KV room the placement took, and the router
would place more than the replica can hold until the next push.

So RouterCore records here every placement it counts, per replica, with
the router's clock at that moment, and applies again, on top of each push,
those made after the push's ``updated_at``; a push taken after a placement
retires it. A request that ends first (its lease released) is taken out.
The clocks are the nodes' wall clocks, which a cluster keeps well within a
stats period of each other. A placement made before the replica read its
stats but still in transit to it is not counted again: the next push
shows it (as before).
"""

from __future__ import annotations

from typing import NamedTuple


class Unreported(NamedTuple):
    """What one placement added to one replica's counts."""

    placed_at: float  # the router's clock (wall-clock seconds)
    kv_tokens: int  # decode replica: KV room held for it (0 on a prefill replica)
    prefill_tokens: int  # uncached prompt tokens queued there (prefill, or a local prefill)


_new = tuple.__new__


class UnreportedPlacements:
    def __init__(self) -> None:
        self._by_replica: dict[str, dict[str, Unreported]] = {}  # replica -> request id -> it
        # request id -> (its decode replica, its prefill replica or None)
        self._replicas_of: dict[str, tuple[str, str | None]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_replica.values())

    def add(self, request_id: str, placed_at: float, decode_replica: str, kv_tokens: int,
            local_prefill_tokens: int, prefill_replica: str | None = None,
            prefill_tokens: int = 0) -> None:
        """A placement counted on ``decode_replica`` (``local_prefill_tokens``
        when it prefills there) and on ``prefill_replica``, if any."""
        by = self._by_replica
        entries = by.get(decode_replica)
        if entries is None:
            entries = by[decode_replica] = {}
        # tuple.__new__: the NamedTuple's own constructor costs ~4x (one per placement)
        entries[request_id] = _new(Unreported, (placed_at, kv_tokens, local_prefill_tokens))
        if prefill_replica is not None:
            entries = by.get(prefill_replica)
            if entries is None:
                entries = by[prefill_replica] = {}
            entries[request_id] = _new(Unreported, (placed_at, 0, prefill_tokens))
        self._replicas_of[request_id] = (decode_replica, prefill_replica)

    def forget(self, request_id: str) -> None:
        """The request ended: nothing of it is counted again."""
        for rid in self._replicas_of.pop(request_id, ()):
            entries = self._by_replica.get(rid) if rid is not None else None
            if entries is not None:
                entries.pop(request_id, None)

    def after(self, replica_id: str, updated_at: float) -> list[Unreported]:
        """The placements on ``replica_id`` made after ``updated_at`` (a push
        taken then lacks them); those made before are retired here (the
        request stays known on its other replica until a push retires it
        there too)."""
        entries = self._by_replica.get(replica_id)
        if not entries:
            return []
        out: list[Unreported] = []
        for request_id, e in list(entries.items()):
            if e.placed_at > updated_at:
                out.append(e)
            else:
                del entries[request_id]
        return out

    def drop_replica(self, replica_id: str) -> None:
        self._by_replica.pop(replica_id, None)
