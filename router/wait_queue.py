"""One model's requests waiting for a replica, in the order they are served.

Order: resumed streams first (``RouteCall.resumed``: they already hold
their client's work), then lower ``priority`` (as vLLM's ``priority``: 0
is the default, negative values go ahead of it), then earlier ``arrival``
(a request keeps
its arrival time when it is retried or moved to another router, so it does
not fall behind requests that came after it), then insertion. Each entry
carries its deadline. A sorted list: queues hold hundreds of requests, and
the router walks them from the front.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field
from itertools import count
from typing import Iterator

from splitserve.router.types import RouteRequest

_SEQ = count()


@dataclass(slots=True)
class Waiting:
    lease_id: str
    holder: str
    request: RouteRequest  # with the router's expected output filled in
    priority: int
    arrival: float
    waiting_since: float
    deadline: float  # wall-clock seconds; inf: none
    admitted: bool
    resumed: bool = False
    queued_at: float = 0.0  # the router's clock when it joined the queue
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (not self.resumed, self.priority, self.arrival, next(_SEQ))

    def __lt__(self, other: "Waiting") -> bool:
        return self.key < other.key


class WaitQueue:
    def __init__(self) -> None:
        self._entries: list[Waiting] = []
        self._by_lease: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Waiting]:
        """Entries in serving order (a copy: the caller may remove while walking)."""
        return iter(tuple(self._entries))

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._by_lease

    def add(self, entry: Waiting) -> None:
        if entry.lease_id in self._by_lease:
            self.remove(entry.lease_id)
        insort(self._entries, entry)
        self._by_lease[entry.lease_id] = entry

    def remove(self, lease_id: str) -> Waiting | None:
        entry = self._by_lease.pop(lease_id, None)
        if entry is not None:
            i = bisect_left(self._entries, entry)
            del self._entries[i]
        return entry

    def first_key(self) -> tuple | None:
        return self._entries[0].key if self._entries else None

    def oldest_wait_s(self, now: float) -> float:
        return max((now - e.waiting_since for e in self._entries), default=0.0)
