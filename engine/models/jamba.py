"""Jamba (``JambaForCausalLM``): Mamba-1 layers (``splitserve.engine.models.mamba1``,
with weighted RMS norms on dt, B and C; checkpoint names ``mamba.*``) beside
attention layers that apply no positional encoding, each followed by a
dense SwiGLU MLP or a sparse block of experts (softmax top-k, unnormalised),
both under ``feed_forward`` (``splitserve.engine.dialects.jamba``).

At load ``pre_ff_layernorm`` is the shared decoder's
``post_attention_layernorm`` and ``feed_forward.router`` the sparse
block's ``gate``. The model applies no RoPE, so it keeps no cos/sin table.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.mamba1 import Mamba1Mixer
from splitserve.engine.models.moe import CHECKPOINT_NAMES, MoECausalLM

_RENAMES = ((".pre_ff_layernorm.", ".post_attention_layernorm."), (".feed_forward.router.", ".feed_forward.gate."))


class JambaCausalLM(HybridCausalLM, MoECausalLM):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.cos_sin_cache = None  # no layer rotates

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout = cfg.options.hybrid
        name = CHECKPOINT_NAMES[cfg.family][0]
        kwargs = {"mlp_name": name}
        if cfg.moe is not None and cfg.moe.sparse_layers[index]:
            kwargs["mlp"] = self.moe_block_class(cfg, dtype, device, prefix=f"{prefix}.{name}")
        if layout.layer_kinds[index] != ATTENTION:
            kwargs.update(mixer=Mamba1Mixer(cfg, dtype, device, layout.state_index(index)), mixer_name="mamba")
        return DecoderLayer(cfg, dtype, device, window, prefix=prefix, **kwargs)

    def rope_table(self, index: int) -> None:
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def renamed(name: str) -> str:
            for old, new in _RENAMES:
                name = name.replace(old, new)
            return name
        super().load_weights((renamed(name), t) for name, t in weights)
