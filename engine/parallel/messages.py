"""What rank 0 and the other ranks of a replica say to each other over their
pipes (the bulk of each step and each KV move goes over the process groups).

Pipes, not collectives, carry the commands: an idle replica's ranks wait on
their pipe for as long as it stays idle (a collective would time out), and
a pipe that closes tells a rank its engine is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to join its replica and load its shard."""

    rank: int
    size: int
    model: str  # checkpoint directory
    dtype: str  # the model's compute dtype, e.g. "float32"
    kv_dtype: str  # the cache's storage dtype
    device: str  # this rank's device, e.g. "cpu", "cuda:1"
    num_blocks: int
    block_size: int
    store_port: int  # rank 0's TCPStore, on 127.0.0.1
    prefix: str  # the replica's key prefix in the store
    secret: bytes  # every rank proves it (splitserve.engine.parallel.group)
    num_threads: int  # torch intra-op threads, as rank 0 runs with
    parent_pid: int  # the rank exits when this process is gone
    num_state_slots: int = 0  # a hybrid model's recurrent-state slots (as rank 0 holds)
    weight_dtype: str = "auto"  # "fp8": quantize the shard's projections once loaded
    max_loras: int = 0  # LoRA slots on the shard's projections (as rank 0 holds)
    max_lora_rank: int = 0


@dataclass(frozen=True)
class RankJoining:
    """The rank read the checkpoint's config and is joining the groups now."""

    rank: int


@dataclass(frozen=True)
class RankReady:
    rank: int


@dataclass(frozen=True)
class RankFailed:
    rank: int
    error: str


@dataclass(frozen=True)
class StepCommand:
    """One forward step, as ``ModelRunner.prepare`` built it on rank 0.

    Every rank runs the forward over these tokens, then the same LM-head
    calls as rank 0: one per ``PROMPT_LOGPROB_ROWS`` slice of
    ``prompt_rows``, then one over ``logit_rows`` when it is not empty.

    A hybrid model's ranks first repeat, on their heads' recurrent states,
    what rank 0 did to its own since the last step (``state_ops``, in order:
    ("copy", src, dst) state checkpoints, ("rollback", slot, tokens) after
    speculative verifies), then this step's zeroing and restores."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]
    cu_query_lens: list[int]
    context_lens: list[int]
    decode_only: bool
    k_scale: float
    v_scale: float
    logit_rows: list[int]
    prompt_rows: list[int]
    state_ops: list[tuple[str, int, int]] = field(default_factory=list)
    fresh_slots: list[int] = field(default_factory=list)
    restores: list[tuple[int, int]] = field(default_factory=list)
    state_slots: list[int] | None = None  # AttentionMetadata's state fields, as rank 0's
    query_lens: tuple[int, ...] | None = None
    keep_states: tuple[bool, ...] | None = None
    # (LoRA slot, tokens) per run of the flat batch (-1: no adapter); None: no token has one
    lora_runs: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class Stop:
    """The replica is shutting down: leave the loop."""


@dataclass(frozen=True)
class WriteAdapter:
    """Put this rank's part of an adapter in LoRA slot ``slot`` (cleared
    first): (layer, projection) -> (A, B) (``lora_shards.shard_adapter``),
    as ``torch.save`` bytes: they travel inside the pipe's message, where
    tensors would go through shared memory (small in many containers)."""

    slot: int
    modules: bytes


@dataclass(frozen=True)
class ClearAdapter:
    """Empty LoRA slot ``slot`` (its adapter was dropped)."""

    slot: int


@dataclass(frozen=True)
class ExportKV:
    """Send layers [layer_start, layer_end) of ``block_ids`` to rank 0 (a gather)."""

    block_ids: list[int]
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class ImportKV:
    """Take this rank's heads of ``num_layers`` layers for ``block_ids`` from
    rank 0 (a scatter), store them from ``layer_start`` on, then a barrier."""

    block_ids: list[int]
    layer_start: int
    num_layers: int


@dataclass(frozen=True)
class ExportState:
    """Send this rank's part of recurrent-state slot ``slot`` to rank 0 (a
    gather per state kind, in sorted kind order)."""

    slot: int


@dataclass(frozen=True)
class ImportState:
    """Repeat ``state_ops`` (rank 0's copies and rollbacks since the last
    step, which may read or write ``slot``: they go before the import, not
    with the next step), then take this rank's part of recurrent-state slot
    ``slot`` from rank 0 (a scatter per state kind, in sorted kind order),
    store it, then a barrier."""

    slot: int
    state_ops: list[tuple[str, int, int]] = field(default_factory=list)
