"""Zamba2's shared attention + MLP blocks, read from config.json by its
dialect and held in ``FamilyOptions.zamba2``; ``splitserve.engine.models.zamba2``
builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Zamba2Blocks:
    """``num_blocks`` shared blocks, the hybrid layers using them in turn;
    ``adapter_rank``: the rank of each use's adapters (on the MLP's gate_up
    always, on q/k/v with ``qkv_adapters``); ``rope``: the blocks' attention
    rotates q and k (``use_mem_rope``)."""

    num_blocks: int = 1
    adapter_rank: int = 128
    qkv_adapters: bool = False
    rope: bool = False

    def __post_init__(self):
        if self.num_blocks < 1 or self.adapter_rank < 1:
            raise ValueError(f"num_mem_blocks {self.num_blocks} and adapter_rank {self.adapter_rank} must be positive")
