"""MiniMax's lightning attention (transformers' ``MiniMaxLightningAttention``,
the ``self_attn`` of its ``linear_attention`` layers) over the engine's flat
batch, its per-sequence state in the recurrent-state store
(``splitserve.engine.state_cache``): per head, the decayed sum of k^T v
[head dim, head dim] ("recurrent", float32).

Per token, per head h with decay rate s_h (``slope_rates``):
q, k, v = SiLU(qkv_proj(x)) (per head [q | k | v]);
S_t = exp(-s_h) S_{t-1} + k_t^T v_t and o_t = q_t S_t, no scaling;
then an RMSNorm over all heads (eps 1e-6, the norm's default: not
``rms_norm_eps``), times sigmoid(output_gate(x)), through ``out_proj``.

Sequences of one token run the step batched; a prompt chunk runs in blocks
(``BLOCK`` tokens) of the closed form: each output the decayed earlier state
read by q plus the decayed in-block scores times v. The math is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.layers import Linear, RMSNorm, ShardSlot
from splitserve.engine.models.recurrent_batch import rule_sequences
from splitserve.engine.models.recurrent_mixer import RecurrentMixer
from splitserve.kernels import ops

BLOCK = 256  # tokens of a prompt chunk per block of the closed form (MiniMaxConfig.block_size)
NORM_EPS = 1e-6  # MiniMaxRMSNorm's default, which the lightning layers' norm keeps
# buffers transformers stores beside the weights, computed here from the config
BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def slope_rates(heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """Each head's decay rate [heads] in layer ``layer``: (1 / 2^(8 / heads))^(h + 1),
    scaled by 1 - layer / (num_layers - 1 + 1e-5) + 1e-5, in float32."""
    base = 1 / (2 ** (8 / heads))
    rate = base ** (torch.arange(heads) + 1)
    return rate * (1 - layer / (num_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(RecurrentMixer):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 layer: int, state_index: int):
        super().__init__(state_index)
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        width, h = self.heads * self.head_dim, cfg.hidden_size
        self.qkv_proj = Linear(h, 3 * width, False, dtype, device)
        self.output_gate = Linear(h, width, False, dtype, device)
        self.out_proj = Linear(width, h, False, dtype, device)
        self.norm = RMSNorm(width, NORM_EPS, dtype, device)
        self.register_buffer("slopes", slope_rates(self.heads, layer, cfg.num_layers).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, layer_cache: torch.Tensor | None,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
        t = x.shape[0]
        qkv = F.silu(self.qkv_proj(x)).view(t, self.heads, 3 * self.head_dim).float()
        q, k, v = qkv.split(self.head_dim, dim=-1)
        states = self.states()
        out, kept = rule_sequences(self.step, self.chunked, states["recurrent"], meta.query_lens,
                                   meta.state_slots, meta.keep_states, q, k, v, decode=self.decode)
        self.keep(recurrent=kept)
        normed, _ = self.norm(out.to(x.dtype).reshape(t, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * normed)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
        """``step`` for a batch of single tokens, in place on the state slots
        (``ops.gated_delta_step`` without a correction: one Triton kernel on
        GPUs)."""
        return ops.gated_delta_step(q, k, v, (-self.slopes).expand(q.shape[0], -1), None, state, slots)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of each of B sequences (q, k, v [B, heads, d]; state [B,
        heads, d, d]): (outputs [B, heads, d], the new states)."""
        decay = torch.exp(-self.slopes)[None, :, None, None]
        state = state * decay + k[..., :, None] * v[..., None, :]
        return torch.einsum("bhk,bhkv->bhv", q, state), state

    def chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's chunk (q, k, v [n, heads, d]) from ``state`` [heads, d,
        d], block by block: (outputs [n, heads, d], the state after it)."""
        outs = []
        s = self.slopes[:, None]  # [heads, 1]
        for start in range(0, q.shape[0], BLOCK):
            qb, kb, vb = (y[start:start + BLOCK] for y in (q, k, v))
            m = qb.shape[0]
            pos = torch.arange(m, device=q.device, dtype=torch.float32)
            gap = pos[:, None] - pos[None, :]  # i - j
            diag = torch.where(gap >= 0, torch.exp(-s[:, :, None] * gap.clamp(min=0)), 0.0)  # [heads, m, m]
            scores = torch.einsum("ihk,jhk->hij", qb, kb) * diag
            inter = torch.einsum("ihk,hkv->ihv", qb * torch.exp(-s * (pos + 1)).t()[:, :, None], state)
            outs.append(inter + torch.einsum("hij,jhv->ihv", scores, vb))
            kd = torch.exp(-s * (m - 1 - pos)).t()[:, :, None]  # [m, heads, 1]
            state = state * torch.exp(-s * m)[:, :, None] + torch.einsum("jhk,jhv->hkv", kb * kd, vb)
        return torch.cat(outs), state

    def projection_names(self) -> tuple[str, ...]:
        return ("qkv_proj", "output_gate", "out_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {f"{prefix}.norm.weight": ShardSlot(self.norm.weight), **self.projection_slots(prefix)}
