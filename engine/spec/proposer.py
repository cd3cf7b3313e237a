"""The proposer seam: who drafts the tokens a target model verifies.

A proposer is chosen by name (``SpeculativeConfig.method``) in
``PROPOSERS``; ``register_proposer`` adds one (an EAGLE head or an MTP layer
would draft from the target's hidden states and register the same way).

Who calls what, all on the engine's thread:
  ``SpecDecoder.propose`` (before each ``Scheduler.schedule``)
      -> ``propose(seqs, num_tokens)``: draft tokens for decoding sequences
  ``Scheduler.on_release`` (a sequence finished or was preempted)
      -> ``release(seq_id)``: drop whatever is held for it
  leak checks -> ``all_free()``
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from splitserve.engine.sequence import Sequence
from splitserve.engine.spec.config import SpeculativeConfig


@dataclass(frozen=True)
class ProposerContext:
    """What a proposer may know of the engine it drafts for."""

    engine_cfg: Any  # EngineConfig
    model_cfg: Any  # the target's ModelConfig
    tokenizer: Any  # the target's Tokenizer
    dtype: Any  # torch.dtype the target computes in
    device: Any  # torch.device
    num_blocks: int  # the target's KV blocks


class Proposer(ABC):
    # seconds of the last ``propose`` spent on work done once per sequence,
    # not per draft position (a draft model prefilling a prompt, or catching
    # up on the tokens of steps that ran without drafts); the adaptive rule
    # leaves it out of the draft's per-token cost. Proposers that draft
    # one step per draft position set it; 0.0 otherwise.
    one_off_s: float = 0.0
    # whether drafting k positions costs k times drafting one (a draft
    # model runs a forward per position) or about the same (prompt lookup
    # finds the whole run at once); the adaptive rule charges the measured
    # draft time per position or per step accordingly
    cost_per_position: bool = True

    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """For each of ``seqs`` (running, one token behind: every token but
        the last has KV in the target), at most ``num_tokens[i]`` tokens
        the target is likely to produce next; an empty list proposes
        nothing for that sequence. The target verifies them, so any list
        is safe; only acceptance depends on it."""

    def release(self, seq_id: str) -> None:
        """``seq_id`` left the running batch: free what is held for it."""

    def all_free(self) -> bool:
        """Nothing held for any sequence (the engine's leak checks)."""
        return True


ProposerFactory = Callable[[SpeculativeConfig, ProposerContext], Proposer]
PROPOSERS: dict[str, ProposerFactory] = {}


def register_proposer(name: str) -> Callable[[ProposerFactory], ProposerFactory]:
    def deco(factory: ProposerFactory) -> ProposerFactory:
        PROPOSERS[name] = factory
        return factory
    return deco


def make_proposer(cfg: SpeculativeConfig, ctx: ProposerContext) -> Proposer:
    # the built-in proposers register on import
    from splitserve.engine.spec import draft, ngram  # noqa: F401

    factory = PROPOSERS.get(cfg.method)
    if factory is None:
        raise ValueError(f"unknown speculative method {cfg.method!r}; known: "
                         f"{', '.join(sorted(PROPOSERS))}")
    return factory(cfg, ctx)
