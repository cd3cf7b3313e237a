"""A Mamba-1 layer (transformers' ``MambaMixer``: Mamba's and Falcon-Mamba's
``mixer``, Jamba's ``mamba``) over the engine's flat batch, its per-sequence
state in the recurrent-state store (``splitserve.engine.state_cache``): the
convolution's last inputs ("conv") and the selective scan's [inner, state]
state ("ssm", float32).

Per token, with the shape ``FamilyOptions.mamba`` gives:

- in_proj(h) -> x, z (inner channels each);
- x through the causal depthwise convolution (``conv_kernel`` taps, its
  bias where ``conv_bias``) and SiLU;
- x_proj(x) -> dt (``dt_rank`` dims), B, C (``state_size`` each); Falcon-Mamba
  RMS-normalises each without a weight, Jamba with one (``dt_norms``);
- dt = softplus(dt_proj(dt)) (the bias added in the model dtype, as
  transformers does); A = -exp(A_log) [inner, state];
- the selective scan: s = exp(dt A) s + dt B x; y = s C + D x;
- y * SiLU(z) through out_proj.

Sequences of one token (decoding) run batched; each prompt chunk runs its
scan from its sequence's state (zeroed by the runner at the sequence's
first token), the recurrence step by step, its decays and inputs computed
a block of steps at once (``scan``). A speculative verify chunk
(``meta.keep_states``) keeps the states after each token for
``RecurrentState.rollback``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.errors import CheckpointError
from splitserve.engine.mamba_config import Mamba1Shape
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param
from splitserve.engine.models.recurrent_batch import conv_sequences
from splitserve.kernels import ops
from splitserve.engine.models.recurrent_mixer import RecurrentMixer

SCAN_BLOCK = 128  # prompt steps whose decays and inputs are computed at once


def rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x RMS-normalised over its last dim in float32, rounded back to x's dtype,
    then times ``weight`` (if any)."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


class Mamba1Mixer(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 state_index: int):
        super().__init__(state_index)
        shape: Mamba1Shape = cfg.options.mamba
        if cfg.options.hidden_act != "silu":
            raise CheckpointError(f"config.json: hidden_act {cfg.options.hidden_act!r} is not supported "
                                  "by Mamba layers (their convolution's activation is SiLU here)")
        self.shape = shape
        h, inner, n = cfg.hidden_size, shape.inner, shape.state_size
        self.in_proj = Linear(h, 2 * inner, shape.proj_bias, dtype, device)
        self.conv_weight = empty_param(inner, 1, shape.conv_kernel, dtype=dtype, device=device)
        self.conv_bias = empty_param(inner, dtype=dtype, device=device) if shape.conv_bias else None
        self.x_proj = Linear(inner, shape.dt_rank + 2 * n, False, dtype, device)
        self.dt_proj = Linear(shape.dt_rank, inner, False, dtype, device)
        self.dt_bias = empty_param(inner, dtype=dtype, device=device)  # dt_proj.bias, added apart
        self.A_log = empty_param(inner, n, dtype=dtype, device=device)
        self.D = empty_param(inner, dtype=dtype, device=device)
        self.out_proj = Linear(inner, h, shape.proj_bias, dtype, device)
        weighted = shape.dt_norms == "weighted"
        self.norm_weights = nn.ParameterDict(
            {k: empty_param(d, dtype=dtype, device=device) for k, d in
             (("dt", shape.dt_rank), ("b", n), ("c", n))} if weighted else {})

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        s = self.shape
        u, z = self.in_proj(x).split([s.inner, s.inner], dim=-1)
        states = self.states()
        conv_state, ssm_state = states["conv"], states["ssm"]
        lens, slots = meta.query_lens, meta.state_slots
        keep = meta.keep_states or (False,) * len(lens)
        u, kept_conv = conv_sequences(u, conv_state, self.conv_weight[:, 0, :], lens, slots, keep,
                                      bias=self.conv_bias)
        dt, B, C = self.selective_inputs(u)
        if all(n == 1 for n in lens):  # decoding: every sequence one token, batched, in place
            y = ops.selective_scan_step(u, dt, self.A, B, C, ssm_state, slots)
            y = self.gated(y, u, z, wide=False)
        else:
            y = torch.empty_like(u)
            start = 0
            for i, n in enumerate(lens):
                slot, rows = int(slots[i]), slice(start, start + n)
                out, new = scan(u[rows, None], dt[rows, None], B[rows, None], C[rows, None], self.A,
                                ssm_state[slot:slot + 1], keep_all=keep[i])
                if keep[i]:
                    self.state.keep(self.state_index, slot, {"conv": kept_conv[slot], "ssm": new[:, 0]})
                    new = new[-1]
                y[rows] = self.gated(out[:, 0], u[rows], z[rows], wide=n > 1)
                ssm_state[slot] = new[0]
                start += n
        return self.out_proj(y)

    def gated(self, y: torch.Tensor, u: torch.Tensor, z: torch.Tensor, wide: bool) -> torch.Tensor:
        """(y + D u) * SiLU(z) in u's dtype: computed in float32 for a prompt's
        steps (``wide``), in u's dtype for a single token, as transformers'
        scan and its one-step update round."""
        if wide:
            return ((y + u * self.D.float()) * F.silu(z)).to(u.dtype)
        return (y + u * self.D) * F.silu(z)

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def selective_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj's dt, B and C for the convolved u [T, inner], normed as the
        family does; dt through dt_proj, its bias and softplus."""
        s = self.shape
        dt, B, C = self.x_proj(u).split([s.dt_rank, s.state_size, s.state_size], dim=-1)
        if s.dt_norms:
            w = self.norm_weights
            dt, B, C = (rms(t, s.dt_norm_eps, w[k] if w else None) for t, k in ((dt, "dt"), (B, "b"), (C, "c")))
        dt = F.softplus(self.dt_proj(dt) + self.dt_bias)
        return dt, B, C

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj", "x_proj", "dt_proj", "out_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = self.projection_slots(prefix)
        slots[f"{prefix}.dt_proj.bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.conv1d.weight"] = ShardSlot(self.conv_weight)
        if self.conv_bias is not None:
            slots[f"{prefix}.conv1d.bias"] = ShardSlot(self.conv_bias)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.D"] = ShardSlot(self.D)
        for k, p in self.norm_weights.items():
            slots[f"{prefix}.{k}_layernorm.weight"] = ShardSlot(p)
        return slots


def scan(u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor,
         state: torch.Tensor, keep_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan over n steps of a batch: u, dt [n, b, inner] (or
    [b, inner], one step), B, C [n, b, state], A [inner, state], state
    [b, inner, state] float32. Returns (s C per step in u's dtype, shaped as
    u; the state after the last step, or after each step [n, b, inner,
    state] where ``keep_all``). Each block of ``SCAN_BLOCK`` steps computes
    its decays exp(dt A) and inputs dt B u at once; only the recurrence
    itself runs step by step."""
    one = u.dim() == 2
    if one:
        u, dt, B, C = u[None], dt[None], B[None], C[None]
    s = state.float()
    outs, kept = [], []
    for start in range(0, u.shape[0], SCAN_BLOCK):
        rows = slice(start, start + SCAN_BLOCK)
        d = dt[rows].float()[..., None]  # [m, b, inner, 1]
        decay = torch.exp(d * A)
        inputs = d * B[rows].float()[:, :, None, :] * u[rows].float()[..., None]
        states = torch.empty_like(decay)
        for t in range(decay.shape[0]):
            s = decay[t] * s + inputs[t]
            states[t] = s
        outs.append(torch.matmul(states.to(u.dtype), C[rows][..., None].to(u.dtype))[..., 0])
        if keep_all:
            kept.append(states)
    y = torch.cat(outs)
    if one:
        return y[0], s
    return y, (torch.cat(kept) if keep_all else s)
