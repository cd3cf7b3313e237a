"""Mamba (``MambaForCausalLM``), Falcon-Mamba (``FalconMambaForCausalLM``) and
Mamba-2 (``Mamba2ForCausalLM``): every layer an RMSNorm then a Mamba-1 mixer
(``splitserve.engine.models.mamba1``; Falcon-Mamba's normalises dt, B and C)
or a Mamba-2 mixer (``splitserve.engine.models.mamba2``),
no attention and no MLP, so the engine's KV cache has no layer at all (its
blocks only count tokens); a final RMSNorm (``norm_f``), the LM head tied
to the embeddings unless config.json says otherwise.

``residual_in_fp32`` (transformers' default): the residual stream is kept in
float32, each layer's norm reading it rounded to the model dtype. Checkpoint
names are ``backbone.*`` (the original checkpoints' ``backbone.embedding``
too), mapped at load to the shared decoder's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import ShardSlot, model_norm, norm_slots
from splitserve.engine.models.mamba1 import Mamba1Mixer, rms
from splitserve.engine.models.mamba2 import Mamba2Mixer
from splitserve.engine.models.mapped import renamed
from splitserve.kernels.lora import LoraMeta

_RENAMES = (("backbone.embeddings.", "model.embed_tokens."), ("backbone.embedding.", "model.embed_tokens."),
            ("backbone.norm_f.", "model.norm."), ("backbone.layers.", "model.layers."))


class MambaBlock(nn.Module):
    """RMSNorm then the mixer; the residual add left to the next block."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, index: int):
        super().__init__()
        self.dtype = dtype
        self.stream_dtype = torch.float32 if cfg.options.residual_in_fp32 else dtype
        self.norm = model_norm(cfg, cfg.hidden_size, dtype, device)
        mixer = Mamba1Mixer if cfg.options.mamba is not None else Mamba2Mixer
        self.self_attn = mixer(cfg, dtype, device, index)  # the name HybridCausalLM binds
        self.tp = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                layer_cache: None, meta: AttentionMetadata, cos_sin_cache: None,
                lora: LoraMeta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's mixer output, the residual stream it read: x plus the
        previous stream)."""
        stream = x.to(self.stream_dtype) if residual is None else residual + x
        h, _ = self.norm(stream.to(self.dtype))
        return self.self_attn(positions, h, None, meta), stream

    def enable_lora(self, num_slots: int, max_rank: int) -> dict:
        return {}

    def quantize_fp8_(self) -> None:
        self.self_attn.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {**norm_slots(f"{prefix}.norm", self.norm), **self.self_attn.weight_slots(f"{prefix}.mixer")}


class MambaCausalLM(HybridCausalLM):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.cos_sin_cache = None  # no layer attends

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> MambaBlock:
        return MambaBlock(self.cfg, dtype, device, index)

    def rope_table(self, index: int) -> None:
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, on_layer_done: Callable[[int], None] | None = None,
                lora: LoraMeta | None = None) -> torch.Tensor:
        """Hidden states after ``norm_f`` ([T, hidden]); ``kv_cache`` has no
        layer and ``on_layer_done`` is never called."""
        if kv_cache.shape[0] != 0:
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model caches none")
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, None, meta, None, lora)
        stream = residual + x  # norm_f on the stream as it is (float32 with residual_in_fp32)
        return (rms(stream, self.cfg.rms_norm_eps) * self.norm.weight).to(self.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((renamed(name, _RENAMES), t) for name, t in weights)
