"""A Gated DeltaNet layer (Qwen3-Next's and Qwen3.5's ``linear_attn``) over
the engine's flat batch, its per-sequence state in the recurrent-state store
(``splitserve.engine.state_cache``): the convolution's last inputs
("conv") and the delta rule's state ("recurrent").

Per token: projections give q, k, v (through a causal depthwise convolution
of ``conv_kernel`` taps and SiLU), a gate z, and per value head b and a;
beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias); the gated delta
rule (``splitserve.engine.models.delta_rule``) mixes the sequence; its
output is RMS-normed per value head, times SiLU(z), and projected back.

Sequences of one token (decoding) run batched; each prompt chunk runs on
its own, starting from its sequence's state (zeroed by the runner at the
sequence's first token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.hybrid_config import GatedDeltaNetShape
from splitserve.engine.models.delta_rule import chunked, normalize_qk, recurrent_step
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.state_cache import RecurrentState


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's chunk x [n, C] through the depthwise causal convolution
    ``weight`` [C, K] (plus ``bias`` [C], if any) after its last K - 1 inputs
    ``state`` [C, K - 1]: (SiLU of the output [n, C], the new state)."""
    window = torch.cat([state, x.t().to(state.dtype)], dim=1)  # [C, K - 1 + n]
    # each output's K inputs side by side: on CPUs far faster than a grouped conv1d
    out = (window.unfold(1, weight.shape[1], 1) * weight[:, None, :].to(window.dtype)).sum(-1)  # [C, n]
    if bias is not None:
        out = out + bias.to(window.dtype)[:, None]
    return F.silu(out).t(), window[:, window.shape[1] - state.shape[1]:]


def causal_conv_step(x: torch.Tensor, states: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of a batch of sequences, x [b, C], after their last
    K - 1 inputs ``states`` [b, C, K - 1]: (SiLU of ``causal_conv``'s output
    [b, C], the new states)."""
    window = torch.cat([states, x[:, :, None].to(states.dtype)], dim=2)  # [b, C, K]
    out = (window * weight.to(window.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(window.dtype)
    return F.silu(out), window[:, :, 1:]


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__()
        shape: GatedDeltaNetShape = cfg.options.gated_delta_net
        if cfg.options.hidden_act != "silu":
            raise CheckpointError(f"config.json: hidden_act {cfg.options.hidden_act!r} is not supported "
                                  "by Gated DeltaNet layers (their convolution and gate use SiLU)")
        self.shape = shape
        self.state_index = state_index
        self.eps = cfg.rms_norm_eps
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
        self.state: RecurrentState | None = None

    def bind(self, state: RecurrentState) -> None:
        self.state = state

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[T, hidden] -> (q|k|v [T, conv dim] in the convolution's channel
        order, z [T, Hv, Dv], b [T, Hv], a [T, Hv])."""
        s, t = self.shape, x.shape[0]
        if not s.fused_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(t, s.num_v_heads, s.v_head_dim),
                    self.in_proj_b(x), self.in_proj_a(x))
        r = s.num_v_heads // s.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(t, s.num_k_heads, -1)
        q, k, v, z = qkvz.split([s.k_head_dim, s.k_head_dim, r * s.v_head_dim, r * s.v_head_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(t, s.num_k_heads, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return (qkv, z.reshape(t, s.num_v_heads, s.v_head_dim), b.reshape(t, -1), a.reshape(t, -1))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        s = self.shape
        qkv, z, b, a = self.project(x)
        states = self.state.layer(self.state_index)
        conv_state, rec_state = states["conv"], states["recurrent"]
        weight = self.conv_weight[:, 0, :]
        lens = meta.query_lens
        slots = meta.state_slots
        mixed = torch.empty_like(qkv)
        if all(n == 1 for n in lens):  # decoding: every sequence one token, batched
            out, new = causal_conv_step(qkv, conv_state.index_select(0, slots), weight)
            mixed = out.to(qkv.dtype)
            conv_state.index_copy_(0, slots, new)
        else:
            start = 0
            for i, n in enumerate(lens):
                slot = int(slots[i])
                out, new = causal_conv(qkv[start:start + n], conv_state[slot], weight)
                mixed[start:start + n] = out.to(qkv.dtype)
                conv_state[slot] = new
                start += n
        t = x.shape[0]
        q, k, v = mixed.float().split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
        q = q.view(t, s.num_k_heads, s.k_head_dim)
        k = k.view(t, s.num_k_heads, s.k_head_dim)
        v = v.view(t, s.num_v_heads, s.v_head_dim)
        q, k = normalize_qk(q, k)
        r = s.num_v_heads // s.num_k_heads
        if r > 1:  # each q/k head serves r consecutive value heads
            q, k = q.repeat_interleave(r, dim=1), k.repeat_interleave(r, dim=1)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if all(n == 1 for n in lens):
            out, new = recurrent_step(q, k, v, g, beta, rec_state.index_select(0, slots))
            rec_state.index_copy_(0, slots, new)
        else:
            out = torch.empty_like(v)
            start = 0
            for i, n in enumerate(lens):
                slot = int(slots[i])
                rows = slice(start, start + n)
                if n == 1:
                    o, new = recurrent_step(q[rows], k[rows], v[rows], g[rows], beta[rows],
                                            rec_state[slot:slot + 1])
                    new = new[0]
                else:
                    o, new = chunked(q[rows], k[rows], v[rows], g[rows], beta[rows], rec_state[slot])
                out[rows] = o
                rec_state[slot] = new
                start += n
        return self.out_proj(self.gated_norm(out.to(x.dtype), z).reshape(t, s.value_dim))

    def gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each value head's output (weight times the normed row
        rounded to the model dtype), times SiLU(z) in float32."""
        dtype = o.dtype
        h = o.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.norm_weight * h.to(dtype)
        return (h * F.silu(z.float())).to(dtype)

    def quantize_fp8_(self) -> None:
        for lin in self.projections():
            lin.quantize_fp8_()

    def projections(self) -> list[Linear]:
        names = (("in_proj_qkvz", "in_proj_ba") if self.shape.fused_projections
                 else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))
        return [getattr(self, n) for n in names] + [self.out_proj]

    def enable_lora(self, num_slots: int, max_rank: int) -> dict:
        return {}  # adapters are refused for hybrid families (FamilyOptions)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots: dict[str, ShardSlot] = {}
        names = (("in_proj_qkvz", "in_proj_ba") if self.shape.fused_projections
                 else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))
        for name in (*names, "out_proj"):
            lin = getattr(self, name)
            slots.update(linear_slots(lin, [(f"{prefix}.{name}", 0, lin.out_features)], None))
        slots[f"{prefix}.conv1d.weight"] = ShardSlot(self.conv_weight)
        slots[f"{prefix}.dt_bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.norm.weight"] = ShardSlot(self.norm_weight)
        return slots
