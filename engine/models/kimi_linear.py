"""Kimi Linear (``KimiLinearForCausalLM``): a hybrid of Kimi Delta Attention
layers (``splitserve.engine.models.kimi_delta``, a recurrent state per
sequence) and DeepSeek's multi-head latent attention layers
(``splitserve.engine.models.mla``) without RoPE, each followed by a dense
MLP or DeepSeek-V3's experts (grouped sigmoid router, one ungated shared
expert), as ``mlp_layer_types`` says (``splitserve.engine.dialects.kimi_linear``).

Checkpoints name the experts' block ``block_sparse_moe`` (experts ``w1`` /
``w3`` / ``w2``); transformers saves the dense layers' MLPs under that name
too, while the original checkpoints call them ``mlp``: both load, renamed
to ``mlp`` as transformers does. The model applies no RoPE, so it keeps no
cos/sin table.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.kimi_delta import KimiDeltaAttention
from splitserve.engine.models.mla import MLADecoderLayer
from splitserve.engine.models.moe import MoECausalLM


class LatentDeltaHybrid(HybridCausalLM, MoECausalLM):
    """Latent attention layers (``attention_layer_class``) beside Kimi Delta
    Attention layers (``mixer_class``), each followed by the experts where
    ``cfg.moe`` marks the layer sparse, else a dense MLP: Kimi Linear's and
    the Bailing hybrid's layout."""

    attention_layer_class: type[DecoderLayer] = MLADecoderLayer
    mixer_class: type[KimiDeltaAttention] = KimiDeltaAttention

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout = cfg.options.hybrid
        kwargs = {}
        if cfg.moe.sparse_layers[index]:
            kwargs = {"mlp": self.moe_block_class(cfg, dtype, device, prefix=f"{prefix}.mlp")}
        if layout.layer_kinds[index] == ATTENTION:
            return self.attention_layer_class(cfg, dtype, device, window, prefix=prefix, **kwargs)
        mixer = self.mixer_class(cfg, dtype, device, layout.state_index(index))
        return DecoderLayer(cfg, dtype, device, window, prefix=prefix, mixer=mixer, **kwargs)


class KimiLinearForCausalLM(LatentDeltaHybrid):
    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        self.cos_sin_cache = None  # no layer rotates

    def rope_table(self, index: int) -> None:
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(".block_sparse_moe.", ".mlp."), t) for name, t in weights)
