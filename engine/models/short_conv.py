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
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.lfm2_config import Lfm2Shape
from splitserve.engine.models.recurrent_batch import conv_sequences
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.state_cache import RecurrentState


class ShortConv(nn.Module):
    keeps_verify_states = True  # meta.keep_states: per-token states kept for a rollback

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__()
        shape: Lfm2Shape = cfg.options.lfm2
        h, bias = cfg.hidden_size, shape.conv_bias
        self.state_index = state_index
        self.in_proj = Linear(h, 3 * h, bias, dtype, device)  # rows [B | C | x]
        self.conv_weight = empty_param(h, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.conv_bias = empty_param(h, dtype=dtype, device=device) if bias else None
        self.out_proj = Linear(h, h, bias, dtype, device)
        self.state: RecurrentState | None = None

    def bind(self, state: RecurrentState) -> None:
        self.state = state

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        bx = b * v  # [T, hidden]
        conv_state = self.state.layer(self.state_index)["conv"]  # [slots, hidden, K - 1]
        out, kept = conv_sequences(bx, conv_state, self.conv_weight[:, 0, :], meta.query_lens,
                                   meta.state_slots, meta.keep_states, activation=None, bias=self.conv_bias)
        for slot, steps in kept.items():
            self.state.keep(self.state_index, slot, {"conv": steps})
        return self.out_proj(c * out.to(x.dtype))

    def quantize_fp8_(self) -> None:
        self.in_proj.quantize_fp8_()
        self.out_proj.quantize_fp8_()

    def enable_lora(self, num_slots: int, max_rank: int) -> dict:
        return {}  # adapters are refused for hybrid families (HybridCausalLM)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots: dict[str, ShardSlot] = {}
        for name in ("in_proj", "out_proj"):
            lin = getattr(self, name)
            slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        slots[f"{prefix}.conv.weight"] = ShardSlot(self.conv_weight)
        if self.conv_bias is not None:
            slots[f"{prefix}.conv.bias"] = ShardSlot(self.conv_bias)
        return slots
