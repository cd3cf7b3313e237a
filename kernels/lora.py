"""Batched LoRA: the torch reference ops (the op contracts) and their batch metadata.

A step's flat batch mixes tokens of several adapters and of the base model.
Each adapter that a running sequence uses sits in one of ``S`` device
*slots*; every LoRA projection holds its slots stacked:

    lora_a: [S, n_slices * R, K]   the slices' A matrices (rank R each, zero-padded)
    lora_b: [S, M, R]              the slices' B matrices, scaling folded in (zero-padded)

where a projection fused from several checkpoint projections (q/k/v, or
gate/up) has one slice per part: slice i covers output columns
``[slice_offsets[i], slice_offsets[i + 1])`` and rank columns
``[i * R, (i + 1) * R)``. An adapter that does not target a part leaves its
slice zero.

Two ops add ``x A^T B^T`` to the base projection's output ``y``, per token
with that token's slot (Punica's shrink and expand):

    h = lora_shrink(x, lora_a, meta)                   # [T, n_slices * R] float32
    lora_expand(y, h, lora_b, meta, slice_offsets)     # y[t] += h[t] B_slot(t)^T

``LoraMeta`` describes the batch once per step for every layer: each
token's slot (-1: the base model, untouched) and the tokens grouped by
slot (``sorted_tokens``, with each slot's segment), which the Triton
kernels (``splitserve.kernels.triton.lora``) tile over, one adapter per
tile. Rows of ``h`` for base-model tokens are left unwritten and never read.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class LoraMeta(NamedTuple):
    token_slots: torch.Tensor  # [T] int32: each token's slot, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T] int32: token indices grouped by slot (base tokens last)
    seg_start: torch.Tensor  # [S] int32: where slot s's tokens start in sorted_tokens
    seg_len: torch.Tensor  # [S] int32: how many tokens slot s has


def lora_meta(token_slots: Sequence[int] | torch.Tensor, num_slots: int,
              device: torch.device | str | None = None) -> LoraMeta:
    """The ``LoraMeta`` of a batch whose token t uses slot ``token_slots[t]`` (-1: none)."""
    slots = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots)
    if device is None:
        device = token_slots.device if isinstance(token_slots, torch.Tensor) else "cpu"
    return lora_meta_runs([(s, 1) for s in slots], num_slots, device)


def lora_meta_runs(runs: Sequence[tuple[int, int]], num_slots: int,
                   device: torch.device | str) -> LoraMeta:
    """The ``LoraMeta`` of a flat batch of runs (slot, tokens), in order: a
    step's sequences, each run of tokens using one slot (-1: none). Built on
    the host from plain integers (no device sort: a step's metadata costs
    one small copy per tensor)."""
    groups: list[list[int]] = [[] for _ in range(num_slots + 1)]
    slots: list[int] = []
    for s, n in runs:
        if not -1 <= s < num_slots:
            raise ValueError(f"token {len(slots)} has slot {s}; slots are -1 (none) or "
                             f"0..{num_slots - 1}")
        groups[s if s >= 0 else num_slots].extend(range(len(slots), len(slots) + n))
        slots.extend([s] * n)
    starts, lens, order = [], [], []
    for g in groups[:num_slots]:
        starts.append(len(order))
        lens.append(len(g))
        order.extend(g)
    order.extend(groups[num_slots])

    def tensor(v: list[int]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    return LoraMeta(tensor(slots), tensor(order), tensor(starts), tensor(lens))


def _segments(meta: LoraMeta) -> list[tuple[int, torch.Tensor]]:
    """(slot, its token indices) for each slot with tokens."""
    starts, lens = meta.seg_start.tolist(), meta.seg_len.tolist()
    return [(s, meta.sorted_tokens[a:a + n].long()) for s, (a, n) in enumerate(zip(starts, lens))
            if n > 0]


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """x: [T, K], lora_a: [S, N, K] -> h: [T, N] float32 with
    h[t] = x[t] @ lora_a[slot(t)]^T for tokens with a slot (other rows: unset)."""
    h = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for s, rows in _segments(meta):
        h[rows] = x[rows].float() @ lora_a[s].float().t()
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, meta: LoraMeta,
                slice_offsets: Sequence[int]) -> torch.Tensor:
    """y: [T, M] (in place), h: [T, n_slices * R] float32 (``lora_shrink``),
    lora_b: [S, M, R]; slice i adds h[t, iR:(i+1)R] @ lora_b[slot(t),
    o_i:o_(i+1)]^T to y[t, o_i:o_(i+1)]. h is rounded to lora_b's dtype first
    (where a LoRA layer in that dtype rounds its A output); the sum with y is
    in float32, rounded once to y's dtype. Returns y."""
    r = lora_b.shape[2]
    for s, rows in _segments(meta):
        hs = h[rows].to(lora_b.dtype).float()
        out = y[rows].float()
        for i in range(len(slice_offsets) - 1):
            o0, o1 = slice_offsets[i], slice_offsets[i + 1]
            out[:, o0:o1] += hs[:, i * r:(i + 1) * r] @ lora_b[s, o0:o1].float().t()
        y[rows] = out.to(y.dtype)
    return y
