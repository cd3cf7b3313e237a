"""Which replicas hold which cached KV blocks, keyed by chained block hash.

Replicas report the hashes their block pools stored and evicted
(``splitserve.engine.block_pool`` drains exactly these events); the router asks, per
request, how many leading blocks of the prompt each replica already holds.
A block hash covers its whole prefix, but a replica may have evicted a
parent and kept a child, so a match still walks the chain and stops, per
replica, at the first block it lacks.

Memory is bounded by ``max_entries`` hashes. Eviction is LRU over hashes,
and both ``on_stored`` and ``match`` touch a chain from its last block back
to its first, so within a chain the shared root ends up fresher than its
children: leaves go first, and evicting a root (which would make every
descendant unmatchable) is the last resort. Refreshing a matched chain
costs one LRU move per block, more than the match itself, so only a
``touch_fraction`` of matches (drawn at random) refresh theirs: a prefix
matched a few times while the index turns over stays, one matched once
ages as if it had not been matched.

Holder sets are interned: all hashes held by the same replicas share one
frozenset. Most blocks of a conversation have the same holders, so this
keeps memory near one pointer per hash, and lets ``match`` find where the
holders change along a chain by identity, without reading the sets.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from typing import Iterable, Sequence


class PrefixIndex:
    def __init__(self, max_entries: int, touch_fraction: float = 1.0, seed: int = 0):
        if max_entries < 1:
            raise ValueError(f"PrefixIndex max_entries must be >= 1, got {max_entries}")
        if not 0.0 < touch_fraction <= 1.0:
            raise ValueError(f"PrefixIndex touch_fraction must be in (0, 1], got {touch_fraction}")
        self.max_entries = max_entries
        self.touch_fraction = touch_fraction
        self._draw = random.Random(seed).random
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
        get, move = holders.get, holders.move_to_end
        # the chain's blocks mostly share holder sets: the union with this
        # replica is made and interned once per distinct set, and the intern
        # counts are settled once at the end (all additions first, so no
        # shared instance is dropped while a block still uses it)
        alone = self._intern_ref(alone)
        gained: dict[int, list] = {}  # id(held) -> [held, interned held | {replica}, blocks]
        new = 0
        for h in reversed(hashes):
            held = get(h)
            if held is None:
                holders[h] = alone
                new += 1
            else:
                if replica_id not in held:
                    entry = gained.get(id(held))
                    if entry is None:
                        entry = gained[id(held)] = [held, self._intern_ref(held | alone), 0]
                    holders[h] = entry[1]
                    entry[2] += 1
                move(h)
        own.update(hashes)
        interned = self._interned
        if new:
            interned[alone][1] += new
        for _, union, n in gained.values():
            interned[union][1] += n
        for held, _, n in gained.values():
            self._release(held, n)
        for s in (alone, *(union for _, union, _ in gained.values())):
            if interned[s][1] == 0:  # interned for nothing (e.g. every block already held)
                del interned[s]
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
        """Leading blocks of ``hashes`` each replica holds: replica id ->
        matched block count (replicas matching none are absent). Refreshes
        the matched blocks in the LRU order (``touch_fraction`` of the time).

        A replica's cached blocks of a chain are taken to form a prefix of
        it. Engines keep it so: a sequence frees its tail blocks first and a
        parent is always in use while a child is, so a pool evicts children
        before parents; and this index touches chains leaf first, root last,
        so its own bound evicts leaves first. Under that rule the holder set
        only shrinks along a chain, so ``match`` bisects for the few blocks
        where it changes (interned sets compare by identity) instead of
        visiting every block: about log2(blocks) lookups per change."""
        get = self._holders.get
        n = len(hashes)
        if not n:
            return {}
        alive = get(hashes[0])  # replicas holding every block so far
        if alive is None:
            return {}
        matched: dict[str, int] = {}
        current, start = alive, 0  # hashes[start] is held by ``current``
        while True:
            # First block after ``start`` whose holders are not ``current``.
            # (A lookup is a likely cache miss in a large index: the holders
            # of block ``hi`` are kept from the search, not looked up again.)
            lo, hi, nxt = start, n, None
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                held = get(hashes[mid])
                if held is current:
                    lo = mid
                else:
                    hi, nxt = mid, held
            if hi == n:  # else the search moved hi, so nxt holds get(hashes[hi])
                depth = n
                break
            if nxt is None:
                depth = hi
                break
            if not alive <= nxt:
                for replica_id in alive - nxt:
                    matched[replica_id] = hi
                alive = alive & nxt
                if not alive:
                    depth = hi
                    break
            current, start = nxt, hi
        for replica_id in alive:
            matched[replica_id] = depth
        if self.touch_fraction >= 1.0 or self._draw() < self.touch_fraction:
            # Leaf first, root last: the root ends up the freshest.
            deque(map(self._holders.move_to_end, hashes[depth - 1::-1]), maxlen=0)
        return matched

    def _intern(self, replicas: frozenset[str]) -> frozenset[str]:
        entry = self._interned.get(replicas)
        if entry is None:
            entry = self._interned[replicas] = [replicas, 0]
        entry[1] += 1
        return entry[0]

    def _intern_ref(self, replicas: frozenset[str]) -> frozenset[str]:
        """The shared instance of ``replicas`` (made, with no user yet, if new)."""
        entry = self._interned.get(replicas)
        if entry is None:
            entry = self._interned[replicas] = [replicas, 0]
        return entry[0]

    def _release(self, replicas: frozenset[str], n: int = 1) -> None:
        entry = self._interned[replicas]
        entry[1] -= n
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
