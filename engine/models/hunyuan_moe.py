"""HunYuan MoE V1: HunYuan dense's decoder (per-head q/k norms after RoPE,
renamed at load: ``splitserve.engine.models.hunyuan``) with the sparse MLP
of ``splitserve.engine.models.moe`` in every layer
(``splitserve.engine.dialects.hunyuan_moe``).

Its router (transformers' ``HunYuanMoEV1Gate``) is kept in float32 as
transformers keeps it: softmax over the logits of ``mlp.gate.wg`` (renamed
at load to the block's ``mlp.gate``), the top k renormalised to sum to
one. The ungated shared MLP (``mlp.shared_mlp``) adds to the routed
experts' output. LoRA adapters are refused (norm and router tensors are
renamed; no adapter layout covers the experts here).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hunyuan import HunYuanDenseCausalLM
from splitserve.engine.models.layers import Linear
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.moe import MoECausalLM, SparseMoeBlock, route


class HunYuanMoeBlock(SparseMoeBlock):
    """The experts with HunYuan's float32 softmax router and ungated shared MLP."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix=prefix)
        self.gate = Linear(cfg.hidden_size, cfg.moe.num_experts, False, torch.float32, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x.float()), self.top_k, renormalize=True)
        return self.run_experts(x, weights, ids) + self.shared_expert(x)


class HunYuanMoeCausalLM(HunYuanDenseCausalLM, MoECausalLM):
    """HunYuan MoE V1 (``HunYuanMoEV1ForCausalLM``): q/k norms and the router renamed at load."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        return self.layer_class(self.cfg, dtype, device, window, prefix=prefix, mlp_name="mlp",
                                mlp=HunYuanMoeBlock(self.cfg, dtype, device, prefix=f"{prefix}.mlp"))

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().renamed(weights):
            yield name.replace(".mlp.gate.wg.", ".mlp.gate."), tensor

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for HunYuan MoE checkpoints (its q/k norm "
                              "and router tensors are renamed at load)")
