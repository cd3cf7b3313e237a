"""DeepSeek-V2 and DeepSeek-V3 (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``)
and GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``): the mixture-of-experts decoder
of GLM-4.5 (``Glm4MoeCausalLM``: dense first layers, or GLM-4.7-Flash's
``mlp_layer_types``, ungated shared experts, multi-token-prediction layers
skipped at load) with multi-head latent attention in every layer
(``splitserve.engine.models.mla``).

Routing, from ``ModelConfig.moe`` (``splitserve.engine.dialects.deepseek_v2``
/ ``deepseek_v3``): V2's float32 softmax router, greedy or group-limited,
scaled and never renormalised (``MoEConfig.scaled_softmax``); V3's grouped
sigmoid router with its correction bias (``MoEConfig.grouped_sigmoid``), as
GLM-4.7-Flash's (``splitserve.engine.dialects.glm4_moe_lite``).

LoRA adapters are refused: the latent attention has none of the shared
decoder's q/k/v projections and its experts take none.
"""

from __future__ import annotations

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.glm4_moe import Glm4MoeCausalLM
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.mla import MLADecoderLayer


class DeepseekCausalLM(Glm4MoeCausalLM):
    """DeepSeek V2 / V3: ``MLADecoderLayer`` layers, dense or with the experts."""

    layer_class = MLADecoderLayer

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError(f"LoRA adapters are not supported for {self.cfg.architecture} checkpoints "
                              "(multi-head latent attention has no q/k/v projections of the shapes "
                              "adapters target; its experts take none)")
