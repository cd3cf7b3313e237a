"""A Mamba-2 layer (Granite 4.0-H's, Bamba's, Nemotron-H's, Falcon-H1's and
Zamba2's) over the engine's flat batch, its per-sequence state in the
recurrent-state store
(``splitserve.engine.state_cache``): the convolution's last inputs ("conv")
and the scan's state ("ssm").

Per token: ``in_proj`` gives the gate z [inner], x|B|C [conv dim] and dt
[heads]; x|B|C go through the causal depthwise convolution (its bias, SiLU:
the dialects refuse other activations); dt = softplus(dt + dt_bias) clamped
to ``time_step_limit``, A = -exp(A_log);
the selective scan (``splitserve.engine.models.ssd``) mixes the sequence,
with the D skip; its output is RMS-normed per group of the inner width,
gated by SiLU(z) (before the norm, or after it with ``norm_before_gate``),
and projected back by ``out_proj``. Falcon-H1 (``Mamba2Shape``'s last
fields) scales in_proj's parts, may skip the norm and gives out_proj its
own bias; Zamba2 norms with its own epsilon.

Sequences of one token (decoding) run batched; each prompt chunk runs on
its own, from its sequence's state (zeroed by the runner at the sequence's
first token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.mamba2_config import Mamba2Shape
from splitserve.engine.models.recurrent_batch import conv_sequences, rule_sequences
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.recurrent_mixer import RecurrentMixer
from splitserve.engine.models.ssd import chunked, heads_of_groups
from splitserve.kernels.recurrent import scan_step
from splitserve.kernels import ops


class Mamba2Mixer(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: Mamba2Shape = cfg.options.mamba2
        self.shape = shape
        self.dtype = dtype  # of the LoRA stacks (RecurrentMixer.enable_lora)
        self.eps = cfg.rms_norm_eps if shape.norm_eps is None else shape.norm_eps
        h, s = cfg.hidden_size, shape
        self.in_proj = Linear(h, s.inner + s.conv_dim + s.num_heads, s.proj_bias, dtype, device)
        scale = s.in_proj_scale()  # Falcon-H1's ssm_multipliers, float32 as its mup_vector
        self.register_buffer("in_scale", None if scale is None
                             else torch.tensor(scale, dtype=torch.float32, device=device), persistent=False)
        self.conv_weight = empty_param(s.conv_dim, 1, s.conv_kernel, dtype=dtype, device=device)
        self.conv_bias = empty_param(s.conv_dim, dtype=dtype, device=device) if s.conv_bias else None
        self.dt_bias = empty_param(s.num_heads, dtype=dtype, device=device)
        self.A_log = empty_param(s.num_heads, dtype=dtype, device=device)
        self.D = empty_param(s.num_heads, dtype=dtype, device=device)
        self.norm_weight = empty_param(s.inner, dtype=dtype, device=device) if s.gated_norm else None
        out_bias = s.proj_bias if s.out_proj_bias is None else s.out_proj_bias
        self.out_proj = Linear(s.inner, h, out_bias, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        s, t = self.shape, x.shape[0]
        proj = self.adapted("in_proj", x, lora)  # an adapter's delta before Falcon-H1's scales
        if self.in_scale is not None:
            proj = (proj.float() * self.in_scale).to(proj.dtype)
        z, xbc, dt = proj.split([s.inner, s.conv_dim, s.num_heads], dim=-1)
        states = self.states()
        conv_state, ssm_state = states["conv"], states["ssm"]
        weight, bias = self.conv_weight[:, 0, :], self.conv_bias
        lens, slots, keep = meta.query_lens, meta.state_slots, meta.keep_states
        mixed, kept_conv = conv_sequences(xbc, conv_state, weight, lens, slots, keep, bias=bias)
        xs, B, C = mixed.float().split([s.inner, s.n_groups * s.state_size, s.n_groups * s.state_size], dim=-1)
        xs = xs.view(t, s.num_heads, s.head_dim)
        B = heads_of_groups(B.view(t, s.n_groups, s.state_size), s.num_heads)
        C = heads_of_groups(C.view(t, s.n_groups, s.state_size), s.num_heads)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*s.time_step_limit)
        A, D = -self.A_log.float().exp(), self.D.float()
        y, kept = rule_sequences(lambda x_, dt_, b_, c_, st: scan_step(x_, dt_, A, b_, c_, D, st),
                                 lambda x_, dt_, b_, c_, st: chunked(x_, dt_, A, b_, c_, D, st),
                                 ssm_state, lens, slots, keep, xs, dt, B, C,
                                 decode=lambda x_, dt_, b_, c_, st, sl: ops.ssm_scan_step(
                                     x_, dt_, A, b_, c_, D, st, sl))
        self.keep(conv=kept_conv, ssm=kept)
        return self.adapted("out_proj", self.gated_norm(y.reshape(t, s.inner), z), lora)

    def gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [T, inner] float32 RMS-normed per group of the inner width, times
        SiLU(z) before the norm (after it with ``norm_before_gate``), times the
        weight in float32, rounded once to the model dtype; without the norm
        (Falcon-H1's ``mamba_rms_norm`` false), y times SiLU(z) alone."""
        s = self.shape
        gate = F.silu(z.float())
        if self.norm_weight is None:
            return (y * gate).to(z.dtype)
        h = y if s.norm_before_gate else y * gate
        g = h.view(h.shape[0], s.n_groups, -1)
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).view_as(h)
        if s.norm_before_gate:
            h = h * gate
        return (self.norm_weight.float() * h).to(z.dtype)

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj", "out_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = self.projection_slots(prefix)
        slots[f"{prefix}.conv1d.weight"] = ShardSlot(self.conv_weight)
        if self.conv_bias is not None:
            slots[f"{prefix}.conv1d.bias"] = ShardSlot(self.conv_bias)
        for name in ("dt_bias", "A_log", "D"):
            slots[f"{prefix}.{name}"] = ShardSlot(getattr(self, name))
        if self.norm_weight is not None:
            slots[f"{prefix}.norm.weight"] = ShardSlot(self.norm_weight)
        return slots
