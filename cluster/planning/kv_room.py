"""How many KV blocks a replica's KV memory holds, as the engine sizes them
(``engine.model_runner.num_kv_blocks``): a hybrid model's recurrent states
(``state_slots``: ``STATE_SLOTS_PER_SEQ`` x ``max_num_seqs`` live ones and
its prefix cache's state checkpoints; at tensor-parallel degree N, 1/N of
them where they split by heads) come out of the memory first, the rest is
cut into blocks of every cached layer's K and V (at tensor-parallel degree
N, one rank's share of the KV heads: max(1, Hk/N) of them). The planner's units and the simulator's pools both size
their replicas here.
"""

from __future__ import annotations

import numpy as np

from splitserve.cluster.planning.shapes import ModelShape

# recurrent-state slots per running sequence (engine.model_runner.num_state_slots:
# the running batch's and as many for hand-off imports)
STATE_SLOTS_PER_SEQ = 2
MIN_BLOCKS = 16  # the engine's floor on a memory-sized cache


def state_slots(max_num_seqs, state_checkpoints: int | None = None):
    """Recurrent-state slots of a hybrid model's engine
    (``engine.model_runner.num_state_slots``): the live ones, then the state
    checkpoints (``state_checkpoints``; None: ``max_num_seqs``; 0 without
    prefix caching)."""
    seqs = np.asarray(max_num_seqs)
    return STATE_SLOTS_PER_SEQ * seqs + (seqs if state_checkpoints is None else state_checkpoints)


def state_reserve_bytes(shape: ModelShape, dtype: str, max_num_seqs, state_checkpoints: int | None = None,
                        tensor_parallel: int = 1):
    """Bytes of recurrent state the engine reserves on each rank (0 for a
    model without; at degree N, 1/N of them where they split by heads):
    ``dtype`` is the engine's compute dtype."""
    return (shape.rank_state_bytes_per_sequence(dtype, tensor_parallel)
            * state_slots(max_num_seqs, state_checkpoints))


def rank_kv_bytes_per_token(shape: ModelShape, kv_dtype: str, tensor_parallel: int = 1) -> int:
    """One token's K and V on one tensor-parallel rank."""
    per_token = shape.kv_bytes_per_token(kv_dtype)
    hk = shape.num_kv_heads
    if tensor_parallel > 1 and hk:
        return per_token * max(1, hk // tensor_parallel) // hk
    return per_token


def kv_blocks(shape: ModelShape, kv_memory_bytes, *, kv_dtype: str, dtype: str, block_size,
              max_num_seqs, tensor_parallel: int = 1, max_model_len: int | None = None,
              state_checkpoints: int | None = None):
    """Blocks per replica for ``kv_memory_bytes`` per rank (the engine's
    ``kv_cache_memory_gb``); arguments may be numpy arrays of equal shape.
    0 where the recurrent states alone fill the memory (the engine refuses
    to start). A model without attention layers gets what it counts tokens
    with: a full context (``max_model_len``, else the shape's) per state slot."""
    budget = np.asarray(kv_memory_bytes, dtype=np.float64)
    block_size = np.asarray(block_size)
    states = state_reserve_bytes(shape, dtype, max_num_seqs, state_checkpoints, tensor_parallel)
    room = np.floor(budget) - states
    per_block = rank_kv_bytes_per_token(shape, kv_dtype, tensor_parallel) * block_size
    if shape.cache_layers == 0:
        max_len = max_model_len or shape.max_position
        blocks = state_slots(max_num_seqs, state_checkpoints) * -(-max_len // block_size)
    else:
        blocks = np.maximum(MIN_BLOCKS, np.floor(room / per_block))
    out = np.where(room > 0, blocks, 0)
    return int(out) if out.ndim == 0 else out.astype(np.int64)
