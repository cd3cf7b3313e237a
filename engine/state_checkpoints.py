"""Recurrent-state checkpoints: what lets a hybrid model's engine serve
prefix-cache hits.

A cached KV block alone cannot resume a sequence of a hybrid model: its
recurrent layers need the state after every token before it. So beside the
live state slots (``StateSlots``, two per batch seat) the engine keeps a
bounded pool of checkpoint slots in the same tensors (``RecurrentState``),
each holding the state after a full block of some prompt, keyed by that
block's chained hash (the one prefix caching keys KV blocks by: equal
hashes mean every token up to the end of the block matches).

A checkpoint is taken when a prompt chunk ends on a block boundary
(``KVCacheManager.commit_state``); a waiting sequence resumes from the
longest boundary that has both its KV blocks cached and a checkpoint
(``take``), its live slot filled from the checkpoint by the model runner
before its first chunk runs, where a fresh sequence's is zeroed.
Checkpoints are evicted least recently used first (saving one again or
resuming from it counts as use). One
whose KV blocks were evicted from the prefix cache is not dropped at once:
it is never matched (a hit needs the blocks up to its boundary too), ages
out by LRU, and becomes useful again if a later prompt caches the same
blocks anew (the same hash is the same content).

Plain Python over slot numbers; the copies into checkpoints go through
``copy`` (``RecurrentState.copy_slot``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence


class StateCheckpoints:
    """``num_slots`` checkpoint slots, slot numbers ``first_slot`` on (after
    the live slots). ``copy(src, dst)`` copies one slot's states into
    another."""

    def __init__(self, first_slot: int, num_slots: int, copy: Callable[[int, int], None]):
        if num_slots <= 0:
            raise ValueError(f"a checkpoint pool needs at least one slot, got {num_slots}")
        self.first_slot = first_slot
        self.num_slots = num_slots
        self.copy = copy
        self._free = list(range(first_slot + num_slots - 1, first_slot - 1, -1))
        self._slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, LRU first
        self.saved = 0  # checkpoints taken
        self.restored = 0  # sequences resumed from one

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def save(self, block_hash: int, slot: int) -> None:
        """Copy live ``slot``'s states as the checkpoint of ``block_hash``
        (a no-op but for its recency when one is held: the same hash is the
        same prefix, so the same state). Evicts the least recently used
        checkpoint when every slot holds one."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)
            return
        if self._free:
            ckpt = self._free.pop()
        else:
            ckpt = self._slots.popitem(last=False)[1]
        self._slots[block_hash] = ckpt
        self.copy(slot, ckpt)
        self.saved += 1

    def longest(self, block_hashes: Sequence[int], num_blocks: int) -> int:
        """The most blocks, at most ``num_blocks`` of ``block_hashes``, after
        which a checkpoint is held (0: none)."""
        for k in range(min(num_blocks, len(block_hashes)), 0, -1):
            if block_hashes[k - 1] in self._slots:
                return k
        return 0

    def take(self, block_hash: int) -> int:
        """The slot of the checkpoint of ``block_hash``, for a sequence that
        resumes from it (it becomes the most recently used)."""
        self._slots.move_to_end(block_hash)
        self.restored += 1
        return self._slots[block_hash]

    def holds(self, slot: int) -> bool:
        """Whether checkpoint ``slot`` holds a checkpoint now."""
        return slot in self._slots.values()

    def accounted(self) -> bool:
        """Every slot is either free or holds exactly one checkpoint."""
        held = list(self._slots.values())
        every = set(held) | set(self._free)
        return (len(held) + len(self._free) == self.num_slots and len(every) == self.num_slots
                and every == set(range(self.first_slot, self.first_slot + self.num_slots)))
