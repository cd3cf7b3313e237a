"""The KV block pool: reference counts, prefix-cache map and LRU eviction.

Plain integers only; tensors live in the model runner. A block is *free*
when no sequence references it. A free block may still hold a cached
prefix (it has a hash): it stays findable until it is reused, and free
blocks are reused least-recently-freed first, uncached ones before cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from splitserve.engine.errors import OutOfBlocksError


@dataclass
class CacheEvents:
    """Prefix-cache changes since the last drain (the router's index feed).

    With ``snapshot`` set, ``stored`` is every hash the pool caches now and
    ``evicted`` is empty: the consumer replaces what it held for this pool
    instead of applying a delta."""

    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    snapshot: bool = False

    def __len__(self) -> int:
        return len(self.stored) + len(self.evicted)


class BlockPool:
    """``max_events`` bounds the changes kept between two drains (default 4
    per block): past it they are dropped and the next drain is a snapshot,
    so a pool nobody drains (or drains late) holds bounded memory."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True,
                 max_events: int | None = None):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.max_events = max(4 * num_blocks, 1024) if max_events is None else max_events
        if self.max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {self.max_events}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # free block ids in reuse order: front is reused first
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._events = CacheEvents()
        self._num_events = 0  # len(self._events), kept without a call per event
        self.hits = 0
        self.queries = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def lookup(self, block_hash: int) -> int | None:
        """The block holding the cached content with this hash, if any."""
        if not self.enable_prefix_caching:
            return None
        return self.hash_to_block.get(block_hash)

    def allocate(self) -> int:
        """Take a free block for new content (ref count 1), evicting its cached
        content if it had any."""
        return self.allocate_many(1)[0]

    def allocate_many(self, n: int) -> list[int]:
        """``n`` free blocks for new content (ref count 1 each), in reuse
        order, evicting the cached content any had; none taken when fewer
        than ``n`` are free (OutOfBlocksError)."""
        free = self._free
        if n > len(free):
            raise OutOfBlocksError(f"{n} KV blocks asked for, {len(free)} free")
        pop, block_hash, refs = free.popitem, self.block_hash, self.ref_counts
        out = []
        for _ in range(n):
            block_id = pop(last=False)[0]
            old = block_hash[block_id]
            if old is not None:
                del self.hash_to_block[old]
                block_hash[block_id] = None
                self._record(self._events.evicted, old)
            refs[block_id] = 1
            out.append(block_id)
        return out

    def acquire(self, block_id: int) -> None:
        """Add a reference to an existing (possibly free, cached) block."""
        if self.ref_counts[block_id] == 0:
            del self._free[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        self.release_many((block_id,))

    def release_many(self, block_ids: Iterable[int]) -> None:
        """Drop a reference to each of ``block_ids``, in that order; a block
        left unreferenced is free again, an uncached one reused before any
        cached block (nothing worth keeping)."""
        refs, block_hash, free = self.ref_counts, self.block_hash, self._free
        move = free.move_to_end
        for block_id in block_ids:
            rc = refs[block_id]
            if rc <= 0:
                raise RuntimeError(f"block {block_id} released more often than acquired")
            refs[block_id] = rc - 1
            if rc == 1:
                free[block_id] = None
                if block_hash[block_id] is None:
                    move(block_id, last=False)

    def set_hash(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block's content for prefix reuse."""
        self.set_hashes((block_id,), (block_hash,))

    def set_hashes(self, block_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Register full, computed blocks' contents for prefix reuse, pair by
        pair; a block already hashed, or content already living in another
        block, is left as it is."""
        if not self.enable_prefix_caching:
            return
        block_hash, to_block = self.block_hash, self.hash_to_block
        stored = []
        for block_id, h in zip(block_ids, hashes):
            if block_hash[block_id] is not None or h in to_block:
                continue
            block_hash[block_id] = h
            to_block[h] = block_id
            stored.append(h)
        if stored:
            self._record_many(self._events.stored, stored)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (e.g. after weights change)."""
        for block_id in list(self._free):
            h = self.block_hash[block_id]
            if h is not None:
                del self.hash_to_block[h]
                self.block_hash[block_id] = None
                self._record(self._events.evicted, h)

    def _record(self, events: list[int], block_hash: int) -> None:
        self._record_many(events, (block_hash,))

    def _record_many(self, events: list[int], hashes: Sequence[int]) -> None:
        if self._events.snapshot:
            return  # the next drain reports the whole state anyway
        events.extend(hashes)
        self._num_events += len(hashes)
        if self._num_events > self.max_events:
            self.request_snapshot()

    def request_snapshot(self) -> None:
        """Make the next drain a snapshot (e.g. its consumer lost events or
        restarted); the changes held until now are dropped."""
        self._events = CacheEvents(snapshot=True)
        self._num_events = 0

    def drain_events(self) -> CacheEvents:
        """The changes since the last drain, or a snapshot (see CacheEvents)."""
        ev, self._events = self._events, CacheEvents()
        self._num_events = 0
        if ev.snapshot:
            ev.stored = list(self.hash_to_block)
        return ev

    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is inconsistent."""
        free = set(self._free)
        assert len(free) == len(self._free)
        for b in range(self.num_blocks):
            rc = self.ref_counts[b]
            assert rc >= 0, f"block {b} has negative refs"
            assert (rc == 0) == (b in free), f"block {b}: refs {rc} but free={b in free}"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash map points {h} at block {b} holding another hash"
        assert sum(1 for h in self.block_hash if h is not None) == len(self.hash_to_block)
