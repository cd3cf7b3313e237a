"""The KV hand-off of a tensor-parallel replica: whole heads at rank 0.

Each rank's cache holds its KV heads (``ShardPlan.kv_heads``) of every
block, under the same block tables. The hand-off moves whole-head buffers
([layers, 2, n, BS, Hk, D], as a TP=1 engine packs them), so prefill and
decode replicas of any TP degrees pair without the transports knowing:

- export (prefill side, rank 0's engine thread, between layers of a step):
  every rank packs its heads of the blocks, a gather brings them to rank 0,
  which lays them side by side (a replicated head is read from its first
  rank);
- import (decode side, transport threads): rank 0 scatters each rank its
  heads of the received buffer, every rank stores them, and a barrier
  makes the call return only once every rank has (the sequence is admitted
  after, and its first step reads those blocks on every rank);
- a hybrid model's recurrent states move the same way, whole at rank 0
  (``pack_state`` / ``unpack_state``, ``state_moves``).

Cost: (N-1)/N of the KV bytes cross the TP group once more (NVLink on GPU
nodes, loopback here) and rank 0 holds one whole-head buffer per layer
group in flight. Moves run on their own process group, under one lock at
rank 0, so they never interleave with the forward's collectives: the other
ranks serve them on a thread of their own (``serve``).
"""

from __future__ import annotations

import logging
import os
import threading
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from splitserve.engine.parallel import state_moves
from splitserve.engine.parallel.group import RankFailedError, TPGroup
from splitserve.engine.parallel.messages import ExportKV, ExportState, ImportKV, ImportState, Stop
from splitserve.engine.state_cache import RecurrentState
from splitserve.kernels import ops

log = logging.getLogger("splitserve.engine.parallel")


def _ids(block_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.int64, device=device)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """fp8 caches travel as their bytes (collectives have no fp8 types)."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


class ShardedKV:
    """Rank 0's side: ``pack`` and ``unpack`` whole heads over the ranks."""

    def __init__(self, group: TPGroup, cache: torch.Tensor, conns: list[Connection]):
        self.group = group
        self.cache = cache  # [L, planes, NB, BS, Hk/N (or 1), D]: rank 0's heads
        self.conns = conns  # ranks 1..N-1, their KV thread's pipe
        self.state: RecurrentState | None = None  # rank 0's recurrent states (hybrid models)
        self._lock = threading.Lock()

    def _tell(self, msg: object) -> None:
        try:
            for c in self.conns:
                c.send(msg)
        except (OSError, ValueError) as e:
            raise RankFailedError(f"a tensor-parallel rank is gone: {e}") from e

    def pack(self, block_ids: list[int], layer_start: int, layer_end: int) -> torch.Tensor:
        """[layer_end - layer_start, planes, n, BS, Hk, D]: every head of the blocks."""
        g, plan = self.group, self.group.plan
        with self._lock:
            self._tell(ExportKV(list(block_ids), layer_start, layer_end))
            mine = ops.pack_kv(self.cache, _ids(block_ids, g.device), layer_start, layer_end)
            parts = [torch.empty_like(mine) for _ in range(g.size)]
            opts = dist.GatherOptions()
            opts.rootRank = 0
            g.wait(g.kv_pg.gather([[_wire(p) for p in parts]], [_wire(mine)], opts),
                   "KV export gather")
        *lead, _, d = mine.shape
        out = mine.new_empty(*lead, plan.cfg.num_kv_heads, d)
        for head in range(plan.cfg.num_kv_heads):
            r = plan.kv_head_owner(head)
            out[..., head, :] = parts[r][..., head - plan.kv_heads(r)[0], :]
        return out

    def unpack(self, buf: torch.Tensor, block_ids: list[int], layer_start: int) -> None:
        """Store ``buf`` (whole heads) into ``block_ids`` on every rank."""
        g, plan = self.group, self.group.plan
        buf = buf.to(g.device, self.cache.dtype)
        slices = [buf[..., slice(*plan.kv_heads(r)), :].contiguous() for r in range(g.size)]
        with self._lock:
            self._tell(ImportKV(list(block_ids), layer_start, buf.shape[0]))
            mine = torch.empty_like(slices[0])
            opts = dist.ScatterOptions()
            opts.rootRank = 0
            g.wait(g.kv_pg.scatter([_wire(mine)], [[_wire(t) for t in slices]], opts),
                   "KV import scatter")
            ops.unpack_kv(mine, self.cache, _ids(block_ids, g.device), layer_start)
            g.wait(g.kv_pg.barrier(), "KV import barrier")


    def pack_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Recurrent-state slot ``slot``, whole (name -> [state layers, *shape])."""
        with self._lock:
            self._tell(ExportState(slot))
            return state_moves.gather(self.group, self.state, slot)

    def unpack_state(self, slot: int, states: dict[str, torch.Tensor],
                     state_ops: list[tuple[str, int, int]]) -> None:
        """Store whole ``states`` into slot ``slot`` on every rank, after the
        ranks repeat ``state_ops`` (rank 0's since the last step). Raises
        ValueError (nothing sent) when their kinds or shapes are not this
        model's."""
        state_moves.check_whole(self.group, self.state, states)
        with self._lock:
            self._tell(ImportState(slot, list(state_ops)))
            state_moves.scatter(self.group, self.state, slot, states)


def serve(group: TPGroup, cache: torch.Tensor, conn: Connection,
          state: RecurrentState | None = None) -> None:
    """Ranks 1..N-1: answer rank 0's KV moves until its pipe closes. A move
    that fails ends the process: rank 0's collective with it then fails at
    once rather than at its timeout, and the replica stops."""
    try:
        with torch.inference_mode():  # the cache is an inference tensor
            _serve(group, cache, conn, state)
    except BaseException:
        log.exception("tensor-parallel rank %d failed a KV move; it exits", group.rank)
        os._exit(1)


def _serve(group: TPGroup, cache: torch.Tensor, conn: Connection,
           state: RecurrentState | None) -> None:
    opts_g = dist.GatherOptions()
    opts_g.rootRank = 0
    opts_s = dist.ScatterOptions()
    opts_s.rootRank = 0
    local_heads = cache.shape[-2]
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(msg, Stop):
            return
        if isinstance(msg, ExportState):
            state_moves.export_rows(group, state, msg.slot)
            continue
        if isinstance(msg, ImportState):
            state.replay(msg.state_ops)
            state_moves.import_rows(group, state, msg.slot)
            continue
        idx = _ids(msg.block_ids, group.device)
        if isinstance(msg, ExportKV):
            mine = ops.pack_kv(cache, idx, msg.layer_start, msg.layer_end)
            group.wait(group.kv_pg.gather([], [_wire(mine)], opts_g), "KV export gather")
        elif isinstance(msg, ImportKV):
            shape = (msg.num_layers, cache.shape[1], len(msg.block_ids), cache.shape[3], local_heads,
                     cache.shape[-1])
            mine = torch.empty(shape, dtype=cache.dtype, device=cache.device)
            group.wait(group.kv_pg.scatter([_wire(mine)], [], opts_s), "KV import scatter")
            ops.unpack_kv(mine, cache, idx, msg.layer_start)
            group.wait(group.kv_pg.barrier(), "KV import barrier")
        else:
            raise TypeError(f"unexpected KV command {type(msg).__name__}")
