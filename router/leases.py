"""Admission slots as leases: keyed by request, held by an ingress, expiring.

A lease is one request's slot (``splitserve.router.exchange``). Its holder
(an ingress process) renews all of its leases at once with every exchange;
a holder silent for ``ttl_s`` is taken for dead (``expired_holders``) and
the router ends all of them, so an ingress that dies cannot keep slots.
Leases that ended without a release (expired, refused, dropped from a
``live`` list) are remembered for ``2 * ttl_s``: a late release of one of
them is not unbalanced, and a ``live`` list written before the holder
learned of a refusal does not bring it back (an expired one may come back:
its holder was only slow). Plain data and a clock value passed in: no I/O,
no threads.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator


@dataclass(slots=True)
class Lease:
    lease_id: str
    holder: str
    model: str
    adopted: bool
    """Learned from the holder's ``live`` list, not from a call to this router."""
    decode_replica: str | None = None
    """Where its placement was counted (given back when it ends)."""
    kv_tokens: int = 0
    """The KV room counted there."""
    request_id: str | None = None
    """The ``RouteRequest.request_id`` of that placement."""
    queued: bool = False
    """Waiting in its model's queue."""


class LeaseTable:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._leases: dict[str, Lease] = {}
        self._by_holder: dict[str, set[str]] = {}
        self._holder_expires: dict[str, float] = {}
        self._ended: dict[str, tuple[float, bool]] = {}  # lease id -> (forget after, may come back)
        self._ended_order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def of_holder(self, holder: str) -> Iterator[Lease]:
        for lid in tuple(self._by_holder.get(holder, ())):
            yield self._leases[lid]

    def holders(self) -> tuple[str, ...]:
        return tuple(self._by_holder)

    def add(self, lease: Lease, now: float) -> None:
        self._leases[lease.lease_id] = lease
        self._by_holder.setdefault(lease.holder, set()).add(lease.lease_id)
        self._ended.pop(lease.lease_id, None)
        self.renew(lease.holder, now)

    def renew(self, holder: str, now: float) -> None:
        """The holder was heard from: all of its leases live ``ttl_s`` more."""
        self._holder_expires[holder] = now + self.ttl_s

    def end(self, lease_id: str, now: float, remember: bool = True,
            may_return: bool = False) -> Lease | None:
        """Remove a lease; None if it is not held. ``remember``: it ended
        without its holder's release; ``may_return``: it expired, and the
        holder's ``live`` list may bring it back."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        ids = self._by_holder[lease.holder]
        ids.discard(lease_id)
        if not ids:
            del self._by_holder[lease.holder]
        if remember:
            until = now + 2 * self.ttl_s
            self._ended[lease_id] = (until, may_return)
            self._ended_order.append((until, lease_id))
        return lease

    def ended_recently(self, lease_id: str) -> bool:
        """Ended without a release in the last ``2 * ttl_s``."""
        return lease_id in self._ended

    def may_adopt(self, lease_id: str) -> bool:
        """Whether a ``live`` list naming this unknown lease may bring it back."""
        ended = self._ended.get(lease_id)
        return ended is None or ended[1]

    def expired_holders(self, now: float) -> list[str]:
        """Holders silent for ``ttl_s`` (their leases are the caller's to end);
        also forgets old ended-lease memories."""
        while self._ended_order and self._ended_order[0][0] <= now:
            until, lid = self._ended_order.popleft()
            if self._ended.get(lid, (None,))[0] == until:
                del self._ended[lid]
        gone = [h for h, t in self._holder_expires.items() if t <= now]
        for h in gone:
            del self._holder_expires[h]
        return gone
