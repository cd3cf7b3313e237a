"""Phi-3: the Llama-style decoder stored with fused projections.

Checkpoints hold each attention's q, k and v in one ``qkv_proj`` tensor
(rows [q | k | v]) and each MLP's gate and up in one ``gate_up_proj`` (rows
[gate | up]). They are split by rows at load into the q/k/v and gate/up
names the shared layers read (``CausalLM.weight_slots``), so tensor-parallel
sharding (``splitserve.engine.parallel.sharding``) and LoRA slots work as for
Llama. LongRoPE and ``partial_rotary_factor`` are in
``splitserve.engine.models.rope``; a window on every layer, when config.json
sets ``sliding_window``, in ``ModelConfig.layer_windows``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM

# fused checkpoint module -> the modules its row blocks become
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Phi3CausalLM(CausalLM):
    def _row_blocks(self, module: str) -> tuple[int, ...]:
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg  # the whole model's sizes
        if module == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return q, kv, kv
        return cfg.intermediate_size, cfg.intermediate_size

    def split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors with every fused projection split into its parts."""
        for name, tensor in weights:
            prefix, _, rest = name.rpartition(".")  # rest: weight | bias
            parent, _, module = prefix.rpartition(".")
            if module not in _FUSED:
                yield name, tensor
                continue
            blocks = self._row_blocks(module)
            if tensor.dim() < 1 or tensor.shape[0] != sum(blocks):
                raise CheckpointError(f"tensor {name!r}: expected {sum(blocks)} rows "
                                      f"({' + '.join(map(str, blocks))}), got shape {list(tensor.shape)}")
            for part, rows in zip(_FUSED[module], tensor.split(list(blocks), dim=0)):
                yield f"{parent}.{part}.{rest}", rows

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.split_fused(weights))
