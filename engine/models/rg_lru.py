"""Griffin's recurrent block (RecurrentGemma's ``recurrent`` layers,
transformers' ``RecurrentGemmaRecurrentBlock``) over the engine's flat
batch, its per-sequence states in the recurrent-state store
(``splitserve.engine.state_cache``): the convolution's last K - 1 inputs
("conv") and the RG-LRU's hidden state ("recurrent", float32).

Per token x: two branches of ``lru_width``; y = act(``linear_y`` x) gates
the output; ``linear_x`` x runs through a causal depthwise convolution of K
taps with a bias (no activation), then the RG-LRU:

- input gate i and recurrence gate r: sigmoid of block-diagonal linear maps
  (one [block, block] matrix and bias per head block);
- a = exp(-8 r softplus(``recurrent_param``)); the input x * i scaled by
  sqrt(1 - a^2), except at a sequence's first token (position 0), which
  enters unscaled and drops the state (a = 0);
- h = a h + (scaled input), accumulated in float32.

``linear_out`` projects (h * y) back to hidden_size.

Sequences of one token (decoding) run batched; each prompt chunk runs on
its own, token by token, from its sequence's states (zeroed by the runner
at the sequence's first token); a speculative verify chunk keeps each
token's states (``splitserve.engine.models.recurrent_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.recurrent_batch import conv_sequences, rule_sequences
from splitserve.engine.recurrent_gemma_config import RgLruShape
from splitserve.engine.models.recurrent_mixer import RecurrentMixer


def lru_step(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences: h [B, W] float32 -> a h + x (the
    output and the new state)."""
    h = a.float() * h + x.float()
    return h, h


def lru_chunk(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's chunk x, a [n, W] from state h [W]: (every token's h
    [n, W], the last)."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        h = a[t].float() * h + x[t].float()
        out[t] = h
    return out, h


class RecurrentBlock(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: RgLruShape = cfg.options.rg_lru
        self.shape = shape
        h, w, heads, bw = cfg.hidden_size, shape.lru_width, shape.num_heads, shape.block_width
        self.in_proj = Linear(h, 2 * w, True, dtype, device)  # rows [linear_x | linear_y]
        self.conv_weight = empty_param(w, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.conv_bias = empty_param(w, dtype=dtype, device=device)
        self.recurrent_param = empty_param(w, dtype=dtype, device=device)
        self.input_gate_weight = empty_param(heads, bw, bw, dtype=dtype, device=device)
        self.input_gate_bias = empty_param(heads, bw, dtype=dtype, device=device)
        self.recurrent_gate_weight = empty_param(heads, bw, bw, dtype=dtype, device=device)
        self.recurrent_gate_bias = empty_param(heads, bw, dtype=dtype, device=device)
        self.linear_out = Linear(w, h, True, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        xb, y = self.in_proj(x).chunk(2, dim=-1)
        y = F.gelu(y, approximate="tanh")  # hidden_activation (the dialect admits gelu_pytorch_tanh)
        states = self.states()
        lens, slots, keep = meta.query_lens, meta.state_slots, meta.keep_states
        xb, kept_conv = conv_sequences(xb, states["conv"], self.conv_weight[:, 0, :], lens, slots, keep,
                                       activation=None, bias=self.conv_bias)
        inputs, a = self.gated_inputs(xb, positions)
        h, kept = rule_sequences(lru_step, lru_chunk, states["recurrent"], lens, slots, keep, inputs, a)
        self.keep(conv=kept_conv, recurrent=kept)
        return self.linear_out(h.to(x.dtype) * y)

    def gated_inputs(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RG-LRU's inputs of x [T, W] (after the convolution): (x times
        its input gate, normalised by sqrt(1 - a^2) but at position 0; the
        recurrence's a, 0 at position 0), in x's dtype as transformers
        computes them."""
        s = self.shape
        blocks = x.view(-1, s.num_heads, s.block_width).transpose(0, 1)  # [heads, T, block]

        def gate(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(torch.baddbmm(bias[:, None, :], blocks, weight).transpose(0, 1).reshape(x.shape))

        input_gate = gate(self.input_gate_weight, self.input_gate_bias)
        recurrence_gate = gate(self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -8.0 * recurrence_gate * F.softplus(self.recurrent_param)
        first = (positions == 0)[:, None]  # a sequence's first token: no normalisation, no state
        multiplier = torch.where(first, torch.ones_like(log_a), torch.sqrt(1 - torch.exp(2 * log_a)))
        a = torch.where(first, torch.zeros_like(log_a), torch.exp(log_a))
        return x * input_gate * multiplier.to(x.dtype), a

    def projections(self) -> list[Linear]:
        return [self.in_proj, self.linear_out]

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        w = self.shape.lru_width
        slots = linear_slots(self.in_proj, [(f"{prefix}.linear_x", 0, w), (f"{prefix}.linear_y", w, w)], None)
        slots.update(linear_slots(self.linear_out, [(f"{prefix}.linear_out", 0, self.linear_out.out_features)],
                                  None))
        slots[f"{prefix}.conv_1d.weight"] = ShardSlot(self.conv_weight)
        slots[f"{prefix}.conv_1d.bias"] = ShardSlot(self.conv_bias)
        for name in ("recurrent_param", "input_gate_weight", "input_gate_bias", "recurrent_gate_weight",
                     "recurrent_gate_bias"):
            slots[f"{prefix}.rg_lru.{name}"] = ShardSlot(getattr(self, name))
        return slots
