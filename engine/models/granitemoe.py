"""GraniteMoE and GraniteMoeShared: Granite's decoder (its four multipliers,
``splitserve.engine.models.granite``) with ``SparseMoeBlock`` experts in every
layer; GraniteMoeShared adds a dense SwiGLU MLP beside them, its output added
to the experts' before the residual multiplier.

Their checkpoints fuse each layer's experts; ``GraniteMoeCausalLM`` splits
them at load into the per-expert names ``SparseMoeBlock`` reads:

- ``block_sparse_moe.input_linear.weight`` [E, 2I, hidden], rows [gate | up]
  per expert -> ``block_sparse_moe.experts.e.gate_proj`` / ``up_proj``;
- ``block_sparse_moe.output_linear.weight`` [E, hidden, I] ->
  ``block_sparse_moe.experts.e.down_proj``;
- ``block_sparse_moe.router.layer.weight`` -> ``block_sparse_moe.gate``;
- ``shared_mlp.input_linear.weight`` [2S, hidden] (rows [gate | up]) and
  ``shared_mlp.output_linear.weight`` -> ``shared_mlp.gate_proj`` /
  ``up_proj`` / ``down_proj``.

Tensor parallelism then splits them as it splits any expert and dense MLP.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.granite import GraniteCausalLM, GraniteDecoderLayer
from splitserve.engine.models.layers import MLP, ShardSlot
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.kernels.lora import LoraMeta

_MOE = "block_sparse_moe"


class GraniteMoeDecoderLayer(GraniteDecoderLayer):
    """``GraniteDecoderLayer`` whose MLP is the experts, plus (GraniteMoeShared
    with a ``shared_intermediate_size``) the dense ``shared_mlp``."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = ""):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix, mlp_name=_MOE,
                         mlp=SparseMoeBlock(cfg, dtype, device, prefix=f"{prefix}.{_MOE}"))
        shared = cfg.family in ("granitemoeshared", "granitemoe_swa") and cfg.intermediate_size > 0
        self.shared_mlp = MLP(cfg, dtype, device, prefix=f"{prefix}.shared_mlp") if shared else None

    def feed_forward(self, h: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        if self.shared_mlp is None:
            return super().feed_forward(h, lora)
        out = self.mlp(h) + self.shared_mlp(h)  # the experts take no LoRA, nor does shared_mlp
        return out if self.tp is None else self.tp.all_reduce(out)

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        if self.shared_mlp is not None:
            self.shared_mlp.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        if self.shared_mlp is not None:
            slots.update(self.shared_mlp.weight_slots(f"{prefix}.shared_mlp"))
        return slots


class GraniteMoeCausalLM(GraniteCausalLM):
    """GraniteMoE (``GraniteMoeForCausalLM``, ``GraniteMoeSharedForCausalLM``):
    fused expert tensors split at load."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return GraniteMoeDecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")

    def _full_shape(self, name: str) -> tuple[int, int, int]:
        """(experts, 2 * expert intermediate, hidden) or, for shared_mlp,
        (1, 2 * its intermediate, hidden): the full model's, whatever this rank holds."""
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg
        if ".shared_mlp." in name:
            return 1, 2 * cfg.intermediate_size, cfg.hidden_size
        return cfg.moe.num_experts, 2 * cfg.moe.expert_intermediate_size, cfg.hidden_size

    def split(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """One fused input_linear / output_linear tensor -> its per-projection tensors."""
        e, two_i, h = self._full_shape(name)
        base, fused = name.removesuffix(".weight").rsplit(".", 1)
        shared = ".shared_mlp" in base
        want = (two_i, h) if fused == "input_linear" else (h, two_i // 2)
        want = want if shared else (e, *want)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"tensor {name!r}: expected shape {list(want)}, got {list(tensor.shape)}")
        experts = [(base, tensor)] if shared else [(f"{base}.experts.{j}", tensor[j]) for j in range(e)]
        for prefix, t in experts:
            if fused == "input_linear":
                yield f"{prefix}.gate_proj.weight", t[: two_i // 2]
                yield f"{prefix}.up_proj.weight", t[two_i // 2:]
            else:
                yield f"{prefix}.down_proj.weight", t

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        shared = self.splits_shared_mlp()
        for name, tensor in weights:
            if name.endswith((".input_linear.weight", ".output_linear.weight")) and (
                    shared or ".shared_mlp." not in name):
                yield from self.split(name, tensor)
            elif name.endswith(f".{_MOE}.router.layer.weight"):
                yield name.replace(".router.layer.", ".gate."), tensor
            else:
                yield name, tensor

    def splits_shared_mlp(self) -> bool:
        """Whether fused shared_mlp tensors are split at load (else they stay unexpected)."""
        return self.layers[0].shared_mlp is not None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.renamed(weights))
