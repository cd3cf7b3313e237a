"""The base of a hybrid model's recurrent layers: the token mixer a decoder
layer runs in place of attention (``DecoderLayer(mixer=...)``), its states
in the runner's recurrent-state store (``splitserve.engine.state_cache``).

A mixer reads its state layer's tensors (``states()``), runs the batch with
``splitserve.engine.models.recurrent_batch``, and hands the per-token states
of verify chunks to ``keep`` so speculative decoding can roll rejected
drafts back (``keeps_verify_states``). Its projections (``projection_names``)
are what ``quantize_fp8_`` quantizes, ``projection_slots`` loads by their
checkpoint names and ``enable_lora`` gives LoRA stacks, which ``adapted``
applies (in the families ``HybridCausalLM.takes_lora`` allows)."""

from __future__ import annotations

import torch
from torch import nn

from splitserve.engine.models.layers import Linear, ShardSlot, linear_slots
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.state_cache import RecurrentState
from splitserve.kernels.lora import LoraMeta


class RecurrentMixer(nn.Module):
    keeps_verify_states = True  # every verify chunk's per-token states go to ``keep``

    def __init__(self, state_index: int):
        super().__init__()
        self.state_index = state_index  # its layer among the model's recurrent layers
        self.state: RecurrentState | None = None  # bound by the runner (HybridCausalLM.bind_state)
        self.loras: dict[str, LoraStack] = {}  # projection name -> its stack (enable_lora)

    def bind(self, state: RecurrentState) -> None:
        self.state = state

    def states(self) -> dict[str, torch.Tensor]:
        """This layer's state tensors, kind -> [slots, *shape] (views)."""
        return self.state.layer(self.state_index)

    def keep(self, **kept: dict[int, torch.Tensor]) -> None:
        """kind -> {slot: its state after each token of the slot's verify chunk}:
        every kind of each slot, to ``RecurrentState.keep``."""
        for slot in next(iter(kept.values()), {}):
            self.state.keep(self.state_index, slot, {kind: by_slot[slot] for kind, by_slot in kept.items()})

    # the projections that take LoRA where not all do (Falcon-H1's and Nemotron-H's
    # out_proj: PEFT refuses it there, so no stack is spent on it); None: every one
    lora_projections: tuple[str, ...] | None = None

    def projection_names(self) -> tuple[str, ...]:
        """Its ``Linear`` attributes, by their checkpoint names."""
        return ()

    def projections(self) -> list[Linear]:
        return [getattr(self, n) for n in self.projection_names()]

    def quantize_fp8_(self) -> None:
        for lin in self.projections():
            lin.quantize_fp8_()

    def lora_parts(self, name: str) -> list[tuple[str, int]]:
        """The LoRA targets on projection ``name``'s output, in row order:
        (the adapter's module name, its rows); one, the projection itself,
        unless the checkpoint stores the projection in parts."""
        return [(name, getattr(self, name).out_features)]

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[str, tuple[LoraStack, int]]:
        """A LoRA stack per projection, a slice per part (``lora_parts``), in
        the model dtype (``dtype``, which mixers that take LoRA keep); the
        adapter's module name -> (its stack, its slice)."""
        targets = {}
        for name in self.lora_projections or self.projection_names():
            lin, parts = getattr(self, name), self.lora_parts(name)
            stack = LoraStack(lin.in_features, tuple(rows for _, rows in parts), num_slots, max_rank,
                              self.dtype, lin.weight.device)
            self.add_module(f"{name}_lora", stack)
            self.loras[name] = stack
            targets.update({part: (stack, i) for i, (part, _) in enumerate(parts)})
        return targets

    def adapted(self, name: str, x: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """Projection ``name`` of x plus each token's adapter's delta on its
        whole output (before any split, as PEFT adds it)."""
        y = getattr(self, name)(x)
        stack = self.loras.get(name)
        if lora is not None and stack is not None:
            stack.add_to(y, x, lora)
        return y

    def projection_slots(self, prefix: str) -> dict[str, ShardSlot]:
        """The projections' checkpoint tensors under ``prefix``."""
        slots: dict[str, ShardSlot] = {}
        for name in self.projection_names():
            lin = getattr(self, name)
            slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        return slots
