"""A Kimi Delta Attention (KDA) layer (Kimi Linear's ``self_attn`` in its
``linear_attention`` layers) over the engine's flat batch, its per-sequence
state in the recurrent-state store (``splitserve.engine.state_cache``): the
short convolutions' last inputs ("conv", q, k and v side by side) and the
delta rule's [heads, k dim, v dim] state ("recurrent", float32). Its shape
is a ``GatedDeltaNetShape`` with as many value heads as key heads, values
as wide as keys (``FamilyOptions.gated_delta_net``).

Per token, as transformers' ``KimiLinearDeltaAttention``:

- q, k, v = q_proj(x), k_proj(x), v_proj(x), each through its own causal
  depthwise convolution (``q_conv1d``, ``k_conv1d``, ``v_conv1d``, no bias)
  and SiLU; q and k L2-normalised per head, q scaled by 1/sqrt(head dim);
- the forget gate, one log-decay per head and channel:
  g = -exp(A_log[head]) * softplus(f_b_proj(f_a_proj(x)) + dt_bias), in float32;
- beta = sigmoid(b_proj(x)) per head;
- the gated delta rule with per-channel decay (``kda_rule``);
- the output RMS-normed per head in float32 (``o_norm``, eps ``rms_norm_eps``),
  times sigmoid(g_b_proj(g_a_proj(x))), then ``o_proj``.

The projections read from x (q, k, v, f_a, g_a, b) run as one fused
``Linear``. Sequences of one token (decoding) run batched; each prompt chunk
runs on its own from its sequence's state (zeroed by the runner at the
sequence's first token).
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import GatedDeltaNetShape
from splitserve.engine.models import kda_rule
from splitserve.engine.models.delta_rule import normalize_qk
from splitserve.engine.models.recurrent_batch import conv_sequences, rule_sequences
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.recurrent_mixer import RecurrentMixer
from splitserve.kernels import ops

SOFTPLUS_LINEAR_ABOVE = 20.0  # the forget gate's softplus is the identity above this, as transformers'


class KimiDeltaAttention(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: GatedDeltaNetShape = cfg.options.gated_delta_net
        if cfg.options.hidden_act != "silu":
            raise CheckpointError(f"config.json: hidden_act {cfg.options.hidden_act!r} is not supported "
                                  "by Kimi Delta Attention layers (their convolutions use SiLU)")
        self.heads, self.head_dim = shape.num_k_heads, shape.k_head_dim
        self.width = self.heads * self.head_dim  # q, k, v, the gates: heads x head dim each
        self.eps = cfg.rms_norm_eps
        h, d = cfg.hidden_size, self.head_dim
        self.gate_projections(h, dtype, device)
        self.o_proj = Linear(self.width, h, False, dtype, device)
        self.conv_weight = empty_param(3 * self.width, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.dt_bias = empty_param(self.width, dtype=torch.float32, device=device)  # float32, as transformers
        self.o_norm_weight = empty_param(d, dtype=dtype, device=device)

    def gate_projections(self, h: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """``in_proj`` (q | k | v | f_a | g_a | b, all read from the normed hidden
        state, ``split`` its rows), the low-rank gates' second halves and A_log."""
        d = self.head_dim
        self.split = [3 * self.width, d, d, self.heads]
        self.in_proj = Linear(h, sum(self.split), False, dtype, device)
        self.f_b_proj = Linear(d, self.width, False, dtype, device)
        self.g_b_proj = Linear(d, self.width, False, dtype, device)
        self.A_log = empty_param(1, 1, self.heads, 1, dtype=dtype, device=device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        t, hd = x.shape[0], (self.heads, self.head_dim)
        qkv, f, g_in, b = self.in_proj(x).split(self.split, dim=-1)
        states = self.states()
        mixed, kept_conv = conv_sequences(qkv, states["conv"], self.conv_weight[:, 0, :], meta.query_lens,
                                          meta.state_slots, meta.keep_states)
        q, k, v = (y.reshape(t, *hd) for y in mixed.float().split(self.width, dim=-1))
        q, k = normalize_qk(q, k)
        g = self.forget_gate(f)
        beta = torch.sigmoid(b).float()
        out, kept = rule_sequences(kda_rule.recurrent_step, kda_rule.chunked, states["recurrent"],
                                   meta.query_lens, meta.state_slots, meta.keep_states, q, k, v, g, beta,
                                   decode=ops.gated_delta_step)
        self.keep(conv=kept_conv, recurrent=kept)
        gate = self.output_gate(g_in).view(t, *hd)
        return self.o_proj(self.gated_norm(out.to(x.dtype), gate).reshape(t, self.width))

    def forget_gate(self, f_a: torch.Tensor) -> torch.Tensor:
        """[T, head dim] -> the log-decays [T, heads, head dim], float32."""
        raw = (self.f_b_proj(f_a).float() + self.dt_bias.float()).view(-1, self.heads, self.head_dim)
        softplus = torch.where(raw > SOFTPLUS_LINEAR_ABOVE, raw, torch.log(1.0 + torch.exp(raw)))
        return -self.A_log.float().exp()[0, 0] * softplus

    def output_gate(self, g_a: torch.Tensor) -> torch.Tensor:
        """[T, head dim] -> the output gate's logits [T, heads x head dim]."""
        return self.g_b_proj(g_a)

    def gated_norm(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Each head's output RMS-normed and scaled by the weight, times
        sigmoid(gate), all in float32, rounded to the model dtype."""
        h = o.float()
        h = self.o_norm_weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
        return (h * torch.sigmoid(gate.float())).to(o.dtype)

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj", "f_b_proj", "g_b_proj", "o_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        w, d = self.width, self.head_dim
        rows = [(f"{prefix}.{name}", start, size) for name, start, size in (
            ("q_proj", 0, w), ("k_proj", w, w), ("v_proj", 2 * w, w), ("f_a_proj", 3 * w, d),
            ("g_a_proj", 3 * w + d, d), ("b_proj", 3 * w + 2 * d, self.heads))]
        slots = linear_slots(self.in_proj, rows, None)  # its rows under the checkpoint's names
        for name in ("f_b_proj", "g_b_proj", "o_proj"):
            lin = getattr(self, name)
            slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        for i, name in enumerate(("q_conv1d", "k_conv1d", "v_conv1d")):
            slots[f"{prefix}.{name}.weight"] = ShardSlot(self.conv_weight, i * w, w)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.dt_bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.o_norm.weight"] = ShardSlot(self.o_norm_weight)
        return slots
