"""The gated short convolution of LFM2, LFM2-MoE and LFM3 (their ``conv``
layers, transformers' ``Lfm2ShortConv``) over the engine's flat batch, its
per-sequence state in the recurrent-state store
(``splitserve.engine.state_cache``): the convolution's last K - 1 inputs
("conv").

Per token: ``in_proj`` gives B, C and x (hidden wide each); B * x runs
through a causal depthwise convolution of K taps (``conv_L_cache``, no
activation); C times its output goes through ``out_proj``.

Sequences of one token (decoding) run batched; each prompt chunk runs on
its own, after its sequence's state (zeroed by the runner at the
sequence's first token); a speculative verify chunk keeps each token's
state (``splitserve.engine.models.recurrent_batch``).
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.lfm2_config import Lfm2Shape
from splitserve.engine.models.recurrent_batch import conv_sequences
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.recurrent_mixer import RecurrentMixer


class ShortConv(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: Lfm2Shape = cfg.options.lfm2
        h, bias = cfg.hidden_size, shape.conv_bias
        self.in_proj = Linear(h, 3 * h, bias, dtype, device)  # rows [B | C | x]
        self.conv_weight = empty_param(h, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.conv_bias = empty_param(h, dtype=dtype, device=device) if bias else None
        self.out_proj = Linear(h, h, bias, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        bx = b * v  # [T, hidden]
        conv_state = self.states()["conv"]  # [slots, hidden, K - 1]
        out, kept = conv_sequences(bx, conv_state, self.conv_weight[:, 0, :], meta.query_lens,
                                   meta.state_slots, meta.keep_states, activation=None, bias=self.conv_bias)
        self.keep(conv=kept)
        return self.out_proj(c * out.to(x.dtype))

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj", "out_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = self.projection_slots(prefix)
        slots[f"{prefix}.conv.weight"] = ShardSlot(self.conv_weight)
        if self.conv_bias is not None:
            slots[f"{prefix}.conv.bias"] = ShardSlot(self.conv_bias)
        return slots
