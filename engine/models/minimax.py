"""MiniMax-Text-01 (``MiniMaxForCausalLM``): lightning-attention layers
(``splitserve.engine.models.lightning``, a recurrent state per sequence)
beside Llama attention layers, each followed by Mixtral's experts
(``block_sparse_moe``, ``splitserve.engine.models.moe``), as
``FamilyOptions.hybrid`` says (``splitserve.engine.dialects.minimax``).

Its decoder layer keeps no separate residual stream: each block's residual
is its normed input, the two summed with the config's factors,
``x = norm(x) * alpha + block(norm(x)) * beta`` (transformers'
``MiniMaxDecoderLayer``). transformers stores the lightning layers' decay
buffers (``slope_rate`` and the decays made from it) beside the weights;
they are computed here from the config, and skipped at load.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.lightning import BUFFERS, LightningAttention
from splitserve.engine.models.moe import CHECKPOINT_NAMES, MoECausalLM
from splitserve.kernels.lora import LoraMeta


class MiniMaxDecoderLayer(DecoderLayer):
    """A block then the experts, each residual the block's normed input,
    scaled: ``factors`` = ((attention alpha, beta), (MLP alpha, beta))."""

    def __init__(self, *args, factors: tuple[tuple[float, float], tuple[float, float]], **kwargs):
        super().__init__(*args, **kwargs)
        self.factors = factors

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                layer_cache: torch.Tensor | None, meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
                lora: LoraMeta | None = None) -> tuple[torch.Tensor, None]:
        (alpha, beta), (mlp_alpha, mlp_beta) = self.factors
        h, _ = self.input_layernorm(x)
        x = h * alpha + self.self_attn(positions, h, layer_cache, meta, cos_sin_cache, lora) * beta
        h, _ = self.post_attention_layernorm(x)
        return h * mlp_alpha + self.feed_forward(h, lora) * mlp_beta, None


class MiniMaxForCausalLM(HybridCausalLM, MoECausalLM):
    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout, (full, linear, mlp) = cfg.options.hybrid, cfg.options.residual_factors
        name = CHECKPOINT_NAMES[cfg.family][0]
        kwargs = {"mlp": self.moe_block_class(cfg, dtype, device, prefix=f"{prefix}.{name}"), "mlp_name": name}
        if layout.layer_kinds[index] == ATTENTION:
            return MiniMaxDecoderLayer(cfg, dtype, device, window, prefix=prefix, factors=(full, mlp), **kwargs)
        mixer = LightningAttention(cfg, dtype, device, index, layout.state_index(index))
        return MiniMaxDecoderLayer(cfg, dtype, device, window, prefix=prefix, mixer=mixer,
                                   factors=(linear, mlp), **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, t) for name, t in weights if name.rsplit(".", 1)[-1] not in BUFFERS)
