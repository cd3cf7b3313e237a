"""The device's adapter slots: which adapter sits where, and who uses it.

A replica holds ``num_slots`` adapters on its device at once. A sequence
takes a reference on its adapter's slot when the scheduler admits it and
gives it back when it finishes or is preempted. An adapter not in a slot
takes a free one, else the least recently used slot that no sequence
references (its adapter is evicted: it stays in host memory, see
``splitserve.engine.lora.manager``); when every slot is referenced the
request waits. Plain Python over adapter keys, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotGrant:
    slot: int
    load: bool  # the adapter was not in the slot: its weights must be copied in
    evicted: str | None  # the adapter the slot held before, if any


class SlotTable:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.keys: list[str | None] = [None] * num_slots
        self.refs = [0] * num_slots
        self.last_used = [0] * num_slots
        self._clock = 0
        self.loads = 0  # adapters copied into a slot
        self.evictions = 0

    def slot_of(self, key: str) -> int | None:
        try:
            return self.keys.index(key)
        except ValueError:
            return None

    def can_acquire(self, key: str) -> bool:
        """Whether ``acquire(key)`` would succeed now."""
        return self.slot_of(key) is not None or 0 in self.refs

    def acquire(self, key: str) -> SlotGrant | None:
        """A reference on ``key``'s slot, assigning one if needed; None when
        every slot is referenced by other adapters' sequences."""
        self._clock += 1
        slot = self.slot_of(key)
        if slot is not None:
            self.refs[slot] += 1
            self.last_used[slot] = self._clock
            return SlotGrant(slot, False, None)
        idle = [s for s in range(self.num_slots) if self.refs[s] == 0]
        if not idle:
            return None
        # an empty slot first, else the least recently used one
        slot = min(idle, key=lambda s: (self.keys[s] is not None, self.last_used[s], s))
        evicted = self.keys[slot]
        self.keys[slot] = key
        self.refs[slot] = 1
        self.last_used[slot] = self._clock
        self.loads += 1
        self.evictions += evicted is not None
        return SlotGrant(slot, True, evicted)

    def release(self, slot: int) -> None:
        if self.refs[slot] <= 0:
            raise AssertionError(f"slot {slot} released more often than acquired")
        self.refs[slot] -= 1

    def forget(self, key: str) -> int | None:
        """Empty ``key``'s slot if no sequence references it; the slot, or None."""
        slot = self.slot_of(key)
        if slot is None or self.refs[slot]:
            return None
        self.keys[slot] = None
        return slot

    def resident(self) -> list[str]:
        """The adapters in slots, in slot order."""
        return [k for k in self.keys if k is not None]

    @property
    def in_use(self) -> int:
        """Slots some running sequence references."""
        return sum(1 for r in self.refs if r)
