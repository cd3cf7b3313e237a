"""A request's token state inside one engine.

There are no prefill/decode phases: a sequence has ``num_tokens`` tokens of
which ``num_computed_tokens`` already have KV in the cache; each step the
scheduler lets some of the rest catch up. A fresh prompt is far behind, a
decoding sequence is exactly one token behind (its last sampled token).
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

from splitserve.engine.hashing import ROOT_HASH, hash_block

if TYPE_CHECKING:
    from splitserve.engine.lora.adapter import AdapterRef


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token id or stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the structured-output constraint reached a dead end
    HANDOFF = "handoff"  # prefill done, KV held for a hand-off


class Sequence:
    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        params: Any,  # SamplingParams
        block_size: int,
        hash_salt: bytes = b"",
        arrival_time: float | None = None,
        adapter: "AdapterRef | None" = None,
    ):
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.params = params
        self.block_size = block_size
        self.hash_salt = hash_salt
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        # the LoRA adapter it runs with (None: the base model); its identity
        # roots the block-hash chain, so no other adapter's cache matches
        self.adapter = adapter
        self.hash_root = ROOT_HASH if adapter is None else adapter.hash_root
        self.lora_slot = -1  # the device slot it holds while running (LoraManager)
        self._block_hashes: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_hashes(self) -> list[int]:
        """Chained hashes of every full block of the current tokens (memoised)."""
        bs = self.block_size
        full = self.num_tokens // bs
        while len(self._block_hashes) < full:
            i = len(self._block_hashes)
            parent = self._block_hashes[-1] if i else self.hash_root
            self._block_hashes.append(
                hash_block(parent, self.token_ids[i * bs : (i + 1) * bs], self.hash_salt)
            )
        return self._block_hashes[:full]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
