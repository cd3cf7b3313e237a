"""A Gated DeltaNet layer (Qwen3-Next's and Qwen3.5's ``linear_attn``) over
the engine's flat batch, its per-sequence state in the recurrent-state store
(``splitserve.engine.state_cache``): the convolution's last inputs
("conv") and the delta rule's state ("recurrent").

Per token: projections give q, k, v (through a causal depthwise convolution
of ``conv_kernel`` taps and SiLU), a gate z, and per value head b and a;
beta = sigmoid(b) (times ``beta_scale``), g = -exp(A_log) * softplus(a +
dt_bias); the gated delta rule (``splitserve.engine.models.delta_rule``)
mixes the sequence; its output is RMS-normed per value head, times SiLU(z),
and projected back.

Sequences of one token (decoding) run batched; each prompt chunk runs on
its own, starting from its sequence's state (zeroed by the runner at the
sequence's first token). A speculative verify chunk (``meta.keep_states``)
runs token by token and keeps the state after each token, so the engine can
put back the state after the accepted drafts (``RecurrentState.rollback``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import GatedDeltaNetShape
from splitserve.engine.models.recurrent_batch import conv_sequences, rule_sequences
from splitserve.engine.models.delta_rule import chunked, normalize_qk, recurrent_step
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.recurrent_mixer import RecurrentMixer
from splitserve.kernels import ops


class GatedDeltaNet(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: GatedDeltaNetShape = cfg.options.gated_delta_net
        if cfg.options.hidden_act != "silu":
            raise CheckpointError(f"config.json: hidden_act {cfg.options.hidden_act!r} is not supported "
                                  "by Gated DeltaNet layers (their convolution and gate use SiLU)")
        self.shape = shape
        self.eps = cfg.rms_norm_eps if shape.norm_eps is None else shape.norm_eps
        h = cfg.hidden_size
        self.dtype = dtype
        if shape.fused_projections:  # [q k v z] per key head; [b a] per key head
            self.in_proj_qkvz = Linear(h, 2 * shape.key_dim + 2 * shape.value_dim, False, dtype, device)
            self.in_proj_ba = Linear(h, 2 * shape.num_v_heads, False, dtype, device)
        else:
            self.in_proj_qkv = Linear(h, shape.conv_dim, False, dtype, device)
            self.in_proj_z = Linear(h, shape.value_dim, False, dtype, device)
            self.in_proj_b = Linear(h, shape.num_v_heads, False, dtype, device)
            self.in_proj_a = Linear(h, shape.num_v_heads, False, dtype, device)
        self.conv_weight = empty_param(shape.conv_dim, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.dt_bias = empty_param(shape.num_v_heads, dtype=dtype, device=device)
        self.A_log = empty_param(shape.num_v_heads, dtype=dtype, device=device)
        self.norm_weight = empty_param(shape.v_head_dim, dtype=dtype, device=device)
        self.out_proj = Linear(shape.value_dim, h, False, dtype, device)

    def project(self, x: torch.Tensor, lora=None) -> tuple[torch.Tensor, ...]:
        """[T, hidden] -> (q|k|v [T, conv dim] in the convolution's channel
        order, z [T, Hv, Dv], b [T, Hv], a [T, Hv]), each projection with
        its LoRA delta (``lora``: the step's adapters) before the split."""
        s, t, p = self.shape, x.shape[0], self.adapted
        if not s.fused_projections:
            return (p("in_proj_qkv", x, lora), p("in_proj_z", x, lora).view(t, s.num_v_heads, s.v_head_dim),
                    p("in_proj_b", x, lora), p("in_proj_a", x, lora))
        r = s.num_v_heads // s.num_k_heads
        qkvz = p("in_proj_qkvz", x, lora).view(t, s.num_k_heads, -1)
        q, k, v, z = qkvz.split([s.k_head_dim, s.k_head_dim, r * s.v_head_dim, r * s.v_head_dim], dim=-1)
        b, a = p("in_proj_ba", x, lora).view(t, s.num_k_heads, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return (qkv, z.reshape(t, s.num_v_heads, s.v_head_dim), b.reshape(t, -1), a.reshape(t, -1))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        s = self.shape
        qkv, z, b, a = self.project(x, lora)
        states = self.states()
        conv_state, rec_state = states["conv"], states["recurrent"]
        weight = self.conv_weight[:, 0, :]
        lens = meta.query_lens
        slots = meta.state_slots
        keep = meta.keep_states
        mixed, kept_conv = conv_sequences(qkv, conv_state, weight, lens, slots, keep)
        t = x.shape[0]
        q, k, v = mixed.float().split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
        q = q.view(t, s.num_k_heads, s.k_head_dim)
        k = k.view(t, s.num_k_heads, s.k_head_dim)
        v = v.view(t, s.num_v_heads, s.v_head_dim)
        q, k = normalize_qk(q, k)
        r = s.num_v_heads // s.num_k_heads
        if r > 1:  # each q/k head serves r consecutive value heads
            q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
        beta = (b.sigmoid() * s.beta_scale).float()  # in the model dtype, as transformers rounds it
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        out, kept = rule_sequences(recurrent_step, chunked, rec_state, lens, slots, keep, q, k, v, g, beta,
                                   decode=ops.gated_delta_step)
        self.keep(conv=kept_conv, recurrent=kept)
        return self.adapted("out_proj", self.gated_norm(out.to(x.dtype), z).reshape(t, s.value_dim), lora)

    def gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each value head's output (weight times the normed row
        rounded to the model dtype), times SiLU(z) in float32."""
        dtype = o.dtype
        h = o.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.norm_weight * h.to(dtype)
        return (h * F.silu(z.float())).to(dtype)

    def projection_names(self) -> tuple[str, ...]:
        inputs = (("in_proj_qkvz", "in_proj_ba") if self.shape.fused_projections
                  else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))
        return (*inputs, "out_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = self.projection_slots(prefix)
        slots[f"{prefix}.conv1d.weight"] = ShardSlot(self.conv_weight)
        slots[f"{prefix}.dt_bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.norm.weight"] = ShardSlot(self.norm_weight)
        return slots
