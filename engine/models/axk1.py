"""A.X K1 (``AXK1ForCausalLM``): DeepSeek-V3 (``splitserve.engine.models.deepseek``)
with an RMSNorm on each sparse layer's mixture-of-experts output.

transformers' ``AXK1MoE`` returns ``post_mlp_layernorm(experts(x) + shared_experts(x))``,
which the layer then adds to its residual stream; the dense layers have no
such norm. Checkpoints store it at the layer level
(``model.layers.{i}.post_mlp_layernorm.weight``; transformers renames it into
``mlp.post_mlp_layernorm`` at load, and either name is read here). The
released checkpoints store one for the dense layers too, unused: skipped, as
transformers skips it. (``splitserve.engine.dialects.axk1`` reads the rest.)
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.deepseek import DeepseekCausalLM
from splitserve.engine.models.layers import ShardSlot, model_norm, norm_slots
from splitserve.engine.models.mla import MLADecoderLayer
from splitserve.engine.models.moe import SparseMoeBlock

_NORM = "post_mlp_layernorm"


class NormedMoeBlock(SparseMoeBlock):
    """The experts and shared experts of ``SparseMoeBlock``, their sum RMS-normed."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str = "mlp"):
        super().__init__(cfg, dtype, device, prefix=prefix)
        self.post_mlp_layernorm = model_norm(cfg, cfg.hidden_size, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_mlp_layernorm(super().forward(x))[0]


class AXK1DecoderLayer(MLADecoderLayer):
    """DeepSeek's layer; a sparse one's experts' norm read by its layer-level name."""

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        if isinstance(self.mlp, NormedMoeBlock):
            slots.update(norm_slots(f"{prefix}.{_NORM}", self.mlp.post_mlp_layernorm))
        return slots


class AXK1CausalLM(DeepseekCausalLM):
    """A.X K1: ``NormedMoeBlock`` in the sparse layers."""

    layer_class = AXK1DecoderLayer
    moe_block_class = NormedMoeBlock

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(f".mlp.{_NORM}.", f".{_NORM}."), tensor)
                             for name, tensor in weights)

    def _skipped(self, name: str) -> bool:
        dense = (f"model.layers.{i}.{_NORM}." for i, sparse in enumerate(self.cfg.moe.sparse_layers)
                 if not sparse)
        return super()._skipped(name) or any(name.startswith(p) for p in dense)
