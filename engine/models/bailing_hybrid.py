"""inclusionAI's Bailing hybrid (``BailingHybridForCausalLM``): Kimi Delta
Attention layers with Bailing's gates beside DeepSeek's latent attention
with RoPE and a sigmoid gate per head, each followed by a dense MLP or
DeepSeek-V3's experts (grouped sigmoid router, one ungated shared expert),
as ``FamilyOptions`` says (``splitserve.engine.dialects.bailing_hybrid``).

Bailing's KDA layer differs from Kimi Linear's (``splitserve.engine.models.
kimi_delta``) in its gates only: the forget gate's input ``f_proj`` and the
output gate ``g_proj`` are full-width projections of the hidden state, not
low-rank pairs; A_log holds one value per head; the forget gate may be
bounded (``GatedDeltaNetShape.forget_gate_bound``). The delta rule, the
convolutions and the gated output norm are Kimi's.

Checkpoints keep the original names, mapped at load as transformers maps
them: ``model.word_embeddings`` -> ``model.embed_tokens``, ``attention`` ->
``self_attn``, ``attention.dense`` -> ``o_proj``, ``mlp.gate.expert_bias``
-> the router's correction bias. The multi-token-prediction layers after the
last decoder layer are skipped.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from splitserve.engine.models.kimi_delta import KimiDeltaAttention
from splitserve.engine.models.kimi_linear import LatentDeltaHybrid
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.mapped import renamed
from splitserve.engine.models.mla import MLADecoderLayer, MLAttention

PREFIXES = (("model.word_embeddings.", "model.embed_tokens."),)
RENAMES = ((".attention.", ".self_attn."), (".self_attn.dense.", ".self_attn.o_proj."),
           (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))


class GatedMLAttention(MLAttention):
    """Latent attention whose heads' outputs are scaled by sigmoid(g_proj(x)),
    one gate per head, before o_proj."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, sliding_window: int = 0,
                 prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix)
        self.g_proj = Linear(cfg.hidden_size, cfg.num_heads, False, dtype, device)

    def project_out(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.g_proj(x).float()).to(x.dtype)
        return super().project_out(x, out * gate[..., None])

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        self.g_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        return {**super().weight_slots(prefix),
                **linear_slots(self.g_proj, [(f"{prefix}.g_proj", 0, self.g_proj.out_features)], None)}


class GatedMLADecoderLayer(MLADecoderLayer):
    attention_class = GatedMLAttention


class BailingDeltaAttention(KimiDeltaAttention):
    """Kimi Delta Attention with full-width gate projections (``f_proj``,
    ``g_proj``, read with q, k, v and b as one ``in_proj``) and Bailing's
    forget gate."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, state_index: int):
        super().__init__(cfg, dtype, device, state_index)
        self.bound = cfg.options.gated_delta_net.forget_gate_bound  # None: Kimi's softplus gate

    def gate_projections(self, h: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.split = [3 * self.width, self.width, self.width, self.heads]  # q | k | v | f | g | b
        self.in_proj = Linear(h, sum(self.split), False, dtype, device)
        self.A_log = empty_param(self.heads, dtype=torch.float32, device=device)  # float32, as transformers

    def forget_gate(self, f: torch.Tensor) -> torch.Tensor:
        """[T, heads x head dim] -> the log-decays [T, heads, head dim], float32."""
        raw = (f.float() + self.dt_bias.float()).view(-1, self.heads, self.head_dim)
        rate = self.A_log.float().exp()[:, None]
        if self.bound is not None:
            return self.bound * torch.sigmoid(rate * raw)
        return -rate * F.softplus(raw)

    def output_gate(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def projection_names(self) -> tuple[str, ...]:
        return ("in_proj", "o_proj")

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        w = self.width
        rows = [(f"{prefix}.{name}", i * w, w) for i, name in enumerate(("q_proj", "k_proj", "v_proj", "f_proj",
                                                                         "g_proj"))]
        slots = linear_slots(self.in_proj, [*rows, (f"{prefix}.b_proj", 5 * w, self.heads)], None)
        slots.update(linear_slots(self.o_proj, [(f"{prefix}.o_proj", 0, self.o_proj.out_features)], None))
        for i, name in enumerate(("q_conv1d", "k_conv1d", "v_conv1d")):
            slots[f"{prefix}.{name}.weight"] = ShardSlot(self.conv_weight, i * w, w)
        slots[f"{prefix}.A_log"] = ShardSlot(self.A_log)
        slots[f"{prefix}.dt_bias"] = ShardSlot(self.dt_bias)
        slots[f"{prefix}.o_norm.weight"] = ShardSlot(self.o_norm_weight)
        return slots


class BailingHybridForCausalLM(LatentDeltaHybrid):
    attention_layer_class = GatedMLADecoderLayer
    mixer_class = BailingDeltaAttention

    def _skipped(self, name: str) -> bool:
        n = self.cfg.num_layers
        return super()._skipped(name) or any(name.startswith(f"model.layers.{i}.")
                                             for i in range(n, n + self.cfg.options.mtp_layers))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((renamed(name, PREFIXES, RENAMES), t) for name, t in weights)
