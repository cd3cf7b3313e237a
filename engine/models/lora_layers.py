"""LoRA on the decoder's projections: one ``LoraStack`` per projection.

A stack holds every device slot's A and B for one (possibly fused)
projection, laid out as ``splitserve.kernels.lora`` describes: a fused
q/k/v projection has three slices (q, k, v), gate/up two, o and down one.
Slots an adapter does not fill, and slices it does not target, stay zero,
so they add nothing. Allocated once at the engine's start (``max_loras``
slots of ``max_lora_rank``; CUDA graphs capture these tensors), written
by ``splitserve.engine.lora.manager`` when an adapter takes a slot.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels import ops
from splitserve.kernels.lora import LoraMeta


class LoraStack(nn.Module):
    def __init__(self, d_in: int, slices: tuple[int, ...], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        offsets = [0]
        for width in slices:
            offsets.append(offsets[-1] + width)
        self.slice_offsets = tuple(offsets)
        self.rank = max_rank
        # lora_a: [S, slices * R, in]; lora_b: [S, out, R] (scaling folded in)
        self.register_buffer("lora_a", torch.zeros(num_slots, len(slices) * max_rank, d_in,
                                                   dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, offsets[-1], max_rank, dtype=dtype,
                                                   device=device), persistent=False)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
        """y [T, out] += each token's adapter's x A^T B^T (x: [T, in]); in place."""
        h = ops.lora_shrink(x, self.lora_a, meta)  # [T, slices * R] float32
        return ops.lora_expand(y, h, self.lora_b, meta, self.slice_offsets)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    @torch.no_grad()
    def write(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Slice ``part`` of ``slot``: a [r, in], b [out_part, r] (r <= rank);
        the rest of the slot's slice stays as ``clear`` left it (zero)."""
        r, o0, o1 = a.shape[0], self.slice_offsets[part], self.slice_offsets[part + 1]
        self.lora_a[slot, part * self.rank:part * self.rank + r].copy_(a, non_blocking=True)
        self.lora_b[slot, o0:o1, :r].copy_(b, non_blocking=True)
