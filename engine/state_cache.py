"""The recurrent-state store of a hybrid model: beside the paged KV cache,
each running sequence holds one slot of fixed-size state tensors (a
convolution's last inputs, a linear-attention or SSM state) in every
recurrent layer (``splitserve.engine.hybrid_config``).

``StateSlots`` hands slots out by owner (a sequence id, or a hand-off id
whose reservation the admitted sequence keeps, as block tables do);
``RecurrentState`` holds the tensors ``[state layers, slots, *shape]``, one
per ``StateKind``. A slot is zeroed when its sequence starts from its first
token (a new prompt, or after a preemption by recompute), so a state never
leaks from one sequence to the next.

A state summarises every token before it, so a cached KV block alone
cannot resume a sequence: prefix caching keeps copies of states at block
boundaries in further slots of the same tensors
(``splitserve.engine.state_checkpoints``, ``copy_slot``). A hand-off sends
the state after the prompt with the prompt's blocks
(``KVPort.export_state`` / ``import_state``).

Speculative decoding: a verify step runs a sequence's last token and its
drafts as one chunk, so the state after it has seen every draft. The
recurrent layers keep the state after each of the chunk's tokens
(``keep``) for the sequences the step marks; once the drafts are judged,
``rollback`` puts back the state after the accepted ones.
"""

from __future__ import annotations

import torch

from splitserve.engine.hybrid_config import HybridLayout


class StateSlots:
    """Slots by owner. Plain Python; the engine thread only."""

    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._owned: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self, owner: str) -> int | None:
        """A slot for ``owner`` (its own if it holds one); None when none is free."""
        slot = self._owned.get(owner)
        if slot is not None:
            return slot
        if not self._free:
            return None
        slot = self._free.pop()
        self._owned[owner] = slot
        return slot

    def slot(self, owner: str) -> int:
        return self._owned[owner]

    def release(self, owner: str) -> None:
        """Give back ``owner``'s slot. Idempotent."""
        slot = self._owned.pop(owner, None)
        if slot is not None:
            self._free.append(slot)

    def all_free(self) -> bool:
        return not self._owned and len(self._free) == self.num_slots


class RecurrentState:
    """The state tensors, ``tensors[kind name]``: [state layers, slots, *shape]."""

    def __init__(self, layout: HybridLayout, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.layout = layout
        self.num_slots = num_slots
        n = len(layout.state_layers)
        self.tensors: dict[str, torch.Tensor] = {
            s.name: torch.zeros(n, num_slots, *s.shape,
                                dtype=torch.float32 if s.dtype == "float32" else dtype, device=device)
            for s in layout.states}
        # slot -> state layer -> kind -> [chunk tokens, *shape]: the state after each token of
        # this step's verify chunk (speculative decoding), until ``rollback`` or the next step
        self._kept: dict[int, dict[int, dict[str, torch.Tensor]]] = {}

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """State layer ``index``'s tensors, [slots, *shape] each (views)."""
        return {name: t[index] for name, t in self.tensors.items()}

    def zero(self, slots: list[int]) -> None:
        """Start ``slots`` over (sequences that begin at their first token)."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.int64, device=next(iter(self.tensors.values())).device)
        for t in self.tensors.values():
            t.index_fill_(1, idx, 0)

    def copy_slot(self, src: int, dst: int) -> None:
        """Make slot ``dst``'s states those of slot ``src`` (state checkpoints)."""
        for t in self.tensors.values():
            t[:, dst].copy_(t[:, src])

    def keep(self, layer: int, slot: int, states: dict[str, torch.Tensor]) -> None:
        """State layer ``layer``'s states of ``slot`` after each token of its
        verify chunk (kind -> [tokens, *shape])."""
        self._kept.setdefault(slot, {})[layer] = states

    def rollback(self, slot: int, tokens: int) -> None:
        """Set ``slot`` to its state after the first ``tokens`` tokens of its
        verify chunk (the last token and the accepted drafts)."""
        for layer, states in self._kept.pop(slot, {}).items():
            for name, t in states.items():
                self.tensors[name][layer, slot].copy_(t[tokens - 1])

    def replay(self, ops: list[tuple[str, int, int]]) -> None:
        """Repeat another rank's ``("copy", src, dst)`` and ``("rollback",
        slot, tokens)`` operations, in order (tensor parallel)."""
        for op, a, b in ops:
            if op == "copy":
                self.copy_slot(a, b)
            else:
                self.rollback(a, b)

    def clear_kept(self) -> None:
        """Drop every kept state (a new step begins)."""
        self._kept.clear()

    def pack(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of one slot's states: name -> [state layers, *shape]."""
        return {name: t[:, slot].clone() for name, t in self.tensors.items()}

    def unpack(self, slot: int, states: dict[str, torch.Tensor]) -> None:
        """Write ``pack``'s output (from an engine of the same layout) into ``slot``."""
        if set(states) != set(self.tensors):
            raise ValueError(f"state kinds {sorted(states)} do not match {sorted(self.tensors)}")
        for name, t in self.tensors.items():
            src = states[name]
            if tuple(src.shape) != tuple(t[:, slot].shape):
                raise ValueError(f"state {name!r} of shape {tuple(src.shape)} does not fit "
                                 f"{tuple(t[:, slot].shape)}")
            t[:, slot].copy_(src.to(device=t.device, dtype=t.dtype))
