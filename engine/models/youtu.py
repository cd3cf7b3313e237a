"""Youtu-LLM (``YoutuForCausalLM``): the dense decoder of
``splitserve.engine.models.llama`` with DeepSeek's multi-head latent
attention (``splitserve.engine.models.mla``) in every layer and the gated
MLP, all from ``ModelConfig`` (``splitserve.engine.dialects.youtu``).
Checkpoint tensors keep their names (``self_attn.kv_a_proj_with_mqa``...).

LoRA adapters are refused: the latent attention has none of the shared
decoder's q/k/v projections.
"""

from __future__ import annotations

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.mla import MLADecoderLayer


class YoutuCausalLM(CausalLM):
    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return MLADecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError(f"LoRA adapters are not supported for {self.cfg.architecture} checkpoints "
                              "(multi-head latent attention has no q/k/v projections of the shapes "
                              "adapters target)")
