"""Which replicas hold which cached KV blocks, keyed by chained block hash.

Replicas report the hashes their block pools stored and evicted
(``engine.block_pool`` drains exactly these events); the router asks, per
request, how many leading blocks of the prompt each replica already holds.
A block hash covers its whole prefix, but a replica may have evicted a
parent and kept a child, so a match still walks the chain and stops, per
replica, at the first block it lacks.

Memory is bounded by ``max_entries`` hashes. Eviction is LRU over hashes,
and both ``on_stored`` and ``match`` touch a chain from its last block back
to its first, so within a chain the shared root ends up fresher than its
children: leaves go first, and evicting a root (which would make every
descendant unmatchable) is the last resort.

Holder sets are interned: all hashes held by the same replicas share one
frozenset. Most blocks of a conversation have the same holders, so this
keeps memory near one pointer per hash, and lets ``match`` find where the
holders change along a chain by identity, without reading the sets.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from functools import partial
from itertools import compress, takewhile
from operator import is_not
from typing import Iterable, Sequence

_is_known = partial(is_not, None)


class PrefixIndex:
    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"PrefixIndex max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        # hash -> replicas holding it; order = least recently touched first.
        self._holders: OrderedDict[int, frozenset[str]] = OrderedDict()
        # replica -> hashes it holds, so drop_replica costs only its own entries.
        self._by_replica: dict[str, set[int]] = {}
        # holder set -> [the one shared instance, number of hashes using it]
        self._interned: dict[frozenset[str], list] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, block_hash: int) -> frozenset[str]:
        """Replicas recorded as holding ``block_hash`` (no LRU touch)."""
        return self._holders.get(block_hash, frozenset())

    def num_blocks(self, replica_id: str) -> int:
        """Hashes currently recorded for ``replica_id``."""
        return len(self._by_replica.get(replica_id, ()))

    def num_holder_sets(self) -> int:
        """Distinct holder sets in use (memory grows with this, not with hashes)."""
        return len(self._interned)

    def on_stored(self, replica_id: str, hashes: Sequence[int]) -> None:
        """``replica_id`` now caches these blocks (a chain, first block first)."""
        holders = self._holders
        own = self._by_replica.setdefault(replica_id, set())
        alone = frozenset((replica_id,))
        for h in reversed(hashes):
            held = holders.get(h)
            if held is None:
                holders[h] = self._intern(alone)
            else:
                if replica_id not in held:
                    holders[h] = self._intern(held | alone)
                    self._release(held)
                holders.move_to_end(h)
            own.add(h)
        self._evict_over_bound()

    def on_evicted(self, replica_id: str, hashes: Iterable[int]) -> None:
        """``replica_id`` no longer caches these blocks."""
        own = self._by_replica.get(replica_id)
        if own is None:
            return
        for h in hashes:
            own.discard(h)
            self._forget(h, replica_id)
        if not own:
            del self._by_replica[replica_id]

    def drop_replica(self, replica_id: str) -> None:
        """Forget everything ``replica_id`` held (it died or was removed)."""
        for h in self._by_replica.pop(replica_id, ()):
            self._forget(h, replica_id)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each replica holds without a gap:
        replica id -> matched block count (replicas matching none are absent).
        Refreshes the matched blocks in the LRU order.

        The chain is fetched and compared at C speed; Python only visits the
        blocks whose holder set differs from the previous block's (a replica
        can only drop out there), so the cost is a few C operations per
        block plus O(replicas) per change of holders."""
        holders = self._holders
        if not hashes or hashes[0] not in holders:
            return {}
        held = list(takewhile(_is_known, map(holders.get, hashes)))  # up to the first unknown hash
        n = len(held)
        matched: dict[str, int] = {}
        alive = held[0]  # replicas that hold every block so far
        depth = n
        for i in compress(range(1, n), map(is_not, held[1:n], held[: n - 1])):
            now_held = held[i]
            if not alive <= now_held:
                for replica_id in alive - now_held:
                    matched[replica_id] = i
                alive = alive & now_held
                if not alive:
                    depth = i
                    break
        for replica_id in alive:
            matched[replica_id] = depth
        # Refresh leaf first, root last: the root ends up the freshest.
        deque(map(holders.move_to_end, reversed(hashes[:depth])), maxlen=0)
        return matched

    def _intern(self, replicas: frozenset[str]) -> frozenset[str]:
        entry = self._interned.get(replicas)
        if entry is None:
            entry = self._interned[replicas] = [replicas, 0]
        entry[1] += 1
        return entry[0]

    def _release(self, replicas: frozenset[str]) -> None:
        entry = self._interned[replicas]
        entry[1] -= 1
        if entry[1] == 0:
            del self._interned[replicas]

    def _forget(self, block_hash: int, replica_id: str) -> None:
        held = self._holders.get(block_hash)
        if held is None or replica_id not in held:
            return
        self._release(held)
        if len(held) == 1:
            del self._holders[block_hash]
        else:  # same LRU position: forgetting one holder is not a touch
            self._holders[block_hash] = self._intern(held - {replica_id})

    def _evict_over_bound(self) -> None:
        holders, by_replica = self._holders, self._by_replica
        while len(holders) > self.max_entries:
            block_hash, held = holders.popitem(last=False)
            self._release(held)
            for replica_id in held:
                own = by_replica.get(replica_id)
                if own is not None:
                    own.discard(block_hash)
                    if not own:
                        del by_replica[replica_id]
