"""Bamba (``BambaForCausalLM``): Mamba-2 layers
(``splitserve.engine.models.mamba2``, checkpoint name ``mamba``) beside
Llama attention layers with partial RoPE (``FamilyOptions.rotary_dim``),
every layer followed by a SwiGLU MLP named ``feed_forward`` behind
``pre_ff_layernorm`` (loaded as the decoder's ``post_attention_layernorm``);
the final norm is ``model.final_layernorm``.
"""

from __future__ import annotations

import torch

from splitserve.engine.hybrid_config import ATTENTION
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.hybrid import HybridCausalLM
from splitserve.engine.models.layers import ShardSlot
from splitserve.engine.models.mamba2 import Mamba2Mixer


class BambaCausalLM(HybridCausalLM):
    takes_lora = True  # checked against PEFT (tests/unit/test_lora_engine.py)

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        cfg, prefix = self.cfg, f"model.layers.{index}"
        layout = cfg.options.hybrid
        kwargs = {}
        if layout.layer_kinds[index] != ATTENTION:
            kwargs = {"mixer": Mamba2Mixer(cfg, dtype, device, layout.state_index(index)), "mixer_name": "mamba"}
        return DecoderLayer(cfg, dtype, device, window, mlp_name="feed_forward", prefix=prefix, **kwargs)

    def weight_slots(self) -> dict[str, ShardSlot]:
        """The decoder's slots by Bamba's names: ``pre_ff_layernorm`` for the
        norm before the MLP."""
        return {name.replace(".post_attention_layernorm.", ".pre_ff_layernorm."): slot
                for name, slot in super().weight_slots().items()}
