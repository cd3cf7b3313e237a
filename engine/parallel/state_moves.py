"""The hand-off of a tensor-parallel replica's recurrent states: whole at rank 0.

A hybrid model's states are split across the ranks as its layers are
(``ShardPlan.state_rows``: a Gated DeltaNet layer's conv channels and
value heads), so each rank's ``RecurrentState`` holds its rows of every
slot. A hand-off carries a sequence's states whole, as a TP=1 engine packs
them, so prefill and decode replicas of any TP degrees pair:

- export (prefill side, rank 0): every rank copies its rows of the slot, a
  gather per state kind brings them to rank 0, which lays them out whole;
- import (decode side, rank 0): rank 0 cuts each rank its rows, a scatter
  per kind hands them out, every rank stores them, and a barrier makes the
  call return only once every rank has (the sequence is admitted after).

Kinds move in sorted name order on every rank. These run on the KV moves'
process group, under ``ShardedKV``'s lock, like the KV blocks' moves
(``splitserve.engine.parallel.kv``), whose thread on ranks 1..N-1 serves
them (``export_rows`` / ``import_rows``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from splitserve.engine.parallel.group import TPGroup
from splitserve.engine.state_cache import RecurrentState


def _gather_opts() -> dist.GatherOptions:
    opts = dist.GatherOptions()
    opts.rootRank = 0
    return opts


def _scatter_opts() -> dist.ScatterOptions:
    opts = dist.ScatterOptions()
    opts.rootRank = 0
    return opts


def whole(group: TPGroup, kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' rows of ``kind`` (each [state layers, local rows, ...]) laid
    out whole: [state layers, rows, ...]."""
    plan = group.plan
    lead, rows, *rest = parts[0].shape
    out = parts[0].new_empty(lead, rows * group.size, *rest)
    for r, part in enumerate(parts):
        at = 0
        for start, size in plan.state_rows(kind, r):
            out[:, start:start + size] = part[:, at:at + size]
            at += size
    return out


def rows_of(group: TPGroup, kind: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``kind`` from a whole [state layers, rows, ...]."""
    return torch.cat([full[:, s:s + n] for s, n in group.plan.state_rows(kind, rank)], dim=1)


def gather(group: TPGroup, state: RecurrentState, slot: int) -> dict[str, torch.Tensor]:
    """Rank 0: slot ``slot``'s states, whole (name -> [state layers, *shape])."""
    mine = state.pack(slot)
    out = {}
    for name in sorted(mine):
        parts = [torch.empty_like(mine[name]) for _ in range(group.size)]
        group.wait(group.kv_pg.gather([parts], [mine[name]], _gather_opts()),
                   "state export gather")
        out[name] = whole(group, name, parts)
    return out


def check_whole(group: TPGroup, state: RecurrentState, states: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``states`` are whole states of this model's
    kinds and shapes (checked before any rank is told to move)."""
    if set(states) != set(state.tensors):
        raise ValueError(f"state kinds {sorted(states)} do not match {sorted(state.tensors)}")
    for name, t in state.tensors.items():
        lead, _, rows, *rest = t.shape  # [state layers, slots, local rows, ...]
        want = (lead, rows * group.size, *rest)
        if tuple(states[name].shape) != want:
            raise ValueError(f"state {name!r} of shape {tuple(states[name].shape)} does not fit "
                             f"{want}")


def scatter(group: TPGroup, state: RecurrentState, slot: int,
            states: dict[str, torch.Tensor]) -> None:
    """Rank 0, once the ranks are told (``check_whole`` passed): each rank
    its rows of whole ``states`` into slot ``slot``, then the barrier."""
    for name in sorted(states):
        t = state.tensors[name]
        full = states[name].to(device=t.device, dtype=t.dtype)
        slices = [rows_of(group, name, full, r).contiguous() for r in range(group.size)]
        mine = torch.empty_like(slices[0])
        group.wait(group.kv_pg.scatter([mine], [slices], _scatter_opts()), "state import scatter")
        t[:, slot].copy_(mine)
    group.wait(group.kv_pg.barrier(), "state import barrier")


def export_rows(group: TPGroup, state: RecurrentState, slot: int) -> None:
    """Ranks 1..N-1: their rows of slot ``slot`` to rank 0."""
    mine = state.pack(slot)
    for name in sorted(mine):
        group.wait(group.kv_pg.gather([], [mine[name]], _gather_opts()), "state export gather")


def import_rows(group: TPGroup, state: RecurrentState, slot: int) -> None:
    """Ranks 1..N-1: their rows of slot ``slot`` from rank 0, then the barrier."""
    for name in sorted(state.tensors):
        t = state.tensors[name]
        mine = torch.empty_like(t[:, slot])
        group.wait(group.kv_pg.scatter([mine], [], _scatter_opts()), "state import scatter")
        t[:, slot].copy_(mine)
    group.wait(group.kv_pg.barrier(), "state import barrier")
