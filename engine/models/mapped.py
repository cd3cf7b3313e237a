"""Families whose checkpoints name or lay out tensors otherwise than the
shared decoder's slots (GPT-NeoX, Falcon, GPT-J, OPT...): ``MappedCausalLM``
passes each checkpoint tensor through the family's ``mapped`` on its way to
``CausalLM.load_weights``, and refuses LoRA adapters for the reason the
family gives; ``renamed`` is the usual name mapping."""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.lora_layers import LoraStack


def renamed(name: str, prefixes: Iterable[tuple[str, str]],
            parts: Iterable[tuple[str, str]] = (), count: int = -1) -> str:
    """``name`` with the first of ``prefixes`` (checkpoint prefix, the shared
    decoder's) it starts with replaced, then each of ``parts`` replaced
    within it (``count``: at most so many times each; -1: every time)."""
    for old, new in prefixes:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for old, new in parts:
        name = name.replace(old, new, count)
    return name


class MappedCausalLM(CausalLM):
    """``CausalLM`` loading through ``mapped``; ``lora_refusal``: why the
    family takes no LoRA adapters ("" takes them as the shared decoder does)."""

    lora_refusal = ""

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        """The shared decoder's (name, tensor) pairs for one checkpoint tensor:
        none for a buffer that is no weight, several for a fused one."""
        return ((name, tensor),)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(pair for name, tensor in weights for pair in self.mapped(name, tensor))

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        if self.lora_refusal:
            raise CheckpointError(self.lora_refusal)
        return super().enable_lora(num_slots, max_rank)
