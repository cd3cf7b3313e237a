"""LongCat-Flash (``LongcatFlashForCausalLM``): each of its layers is two
pre-norm sublayers (DeepSeek's latent attention, then a dense SwiGLU MLP)
and a "shortcut" mixture of experts (``splitserve.engine.dialects.longcat_flash``).

Each sublayer is one decoder layer here, with its own KV cache: layer j is
sublayer j % 2 of transformers' layer j // 2. The first sublayer's
post-attention norm output also feeds the shortcut experts; their output is
carried to the second sublayer and added to its MLP's output, so it joins
the residual stream after the second MLP, as transformers adds it.

The shortcut's router (``LongcatFlashTopkRouter``), in float32: a softmax
over the real and the zero-computation experts; the ``top_k`` best scores
plus the correction bias choose, their unbiased scores times
``routed_scaling_factor`` weigh. A chosen zero expert returns the input
times its weight; the real ones run through the fused experts.

At load the checkpoint's names are mapped onto the sublayers
(``model.layers.3.self_attn.1.q_a_proj`` -> ``model.layers.7.self_attn.q_a_proj``,
``mlps.1`` -> ``mlp``, ``mlp.router.classifier`` -> ``shortcut.gate``,
``mlp.experts`` -> ``shortcut.experts``). Multi-token-prediction tensors
(``model.mtp.*``) are skipped, as transformers skips them.

The attention is DeepSeek's (``MLAttention``) with transformers' latent
scales: q_b_proj's output multiplied by sqrt(hidden / q_lora_rank) and
kv_a_layernorm's by sqrt(hidden / kv_lora_rank), each product rounded to
the model dtype as transformers rounds it.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.config import ModelConfig
from splitserve.engine.models.deepseek import DeepseekCausalLM
from splitserve.engine.models.layers import Linear, RMSNorm, ShardSlot, empty_param
from splitserve.engine.models.mla import LATENT_NORM_EPS, MLADecoderLayer
from splitserve.engine.models.moe import SparseMoeBlock
from splitserve.kernels.lora import LoraMeta

_SUBLAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|input_layernorm|post_attention_layernorm|mlps)"
                       r"\.([01])\.(.+)")
_SHORTCUT = re.compile(r"model\.layers\.(\d+)\.mlp\.(router\.classifier|router|experts)\.(.+)")
_SHORTCUT_PARTS = {"router.classifier": "gate", "router": "gate", "experts": "experts"}


class ScaledLinear(Linear):
    """A Linear whose output is multiplied by ``scale`` (LongCat-Flash's q_b_proj)."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str, scale: float):
        super().__init__(d_in, d_out, False, dtype, device)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class ScaledRMSNorm(RMSNorm):
    """An RMSNorm whose output is multiplied by ``scale`` (LongCat-Flash's kv_a_layernorm)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, scale: float):
        super().__init__(dim, LATENT_NORM_EPS, dtype, device)
        self.scale = scale

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, residual = super().forward(x, residual)
        return out * self.scale, residual


class ShortcutMoE(SparseMoeBlock):
    """The shortcut experts: the fused experts of ``SparseMoeBlock`` behind
    LongCat-Flash's router over them and the zero-computation experts."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix=prefix)
        choices = cfg.moe.num_experts + cfg.options.zero_experts
        self.gate = Linear(cfg.hidden_size, choices, False, torch.float32, device)
        self.e_score_correction_bias = empty_param(choices, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x.float()).softmax(dim=-1)  # [T, experts + zero experts]
        ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids) * self.moe.routed_scaling_factor
        zero = ids >= self.moe.num_experts
        identity = weights.masked_fill(~zero, 0.0).sum(dim=-1, keepdim=True)
        out = self.run_experts(x, weights.masked_fill(zero, 0.0), ids.masked_fill(zero, 0))
        return out + (x * identity).to(out.dtype)


class LongcatSublayer(MLADecoderLayer):
    """One sublayer; the first of each pair (even index) also runs the
    shortcut experts, whose output the second adds to its MLP's."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "", **kwargs):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix, **kwargs)
        attn, mla, hidden = self.self_attn, cfg.options.mla, cfg.hidden_size
        attn.q_b_proj = ScaledLinear(mla.q_lora_rank, attn.q_b_proj.out_features, dtype, device,
                                     math.sqrt(hidden / mla.q_lora_rank))
        attn.kv_a_layernorm = ScaledRMSNorm(mla.kv_lora_rank, dtype, device, math.sqrt(hidden / mla.kv_lora_rank))
        first = int(prefix.rsplit(".", 1)[1]) % 2 == 0
        self.shortcut = ShortcutMoE(cfg, dtype, device, prefix=f"{prefix}.shortcut") if first else None
        self.carry: dict[str, torch.Tensor] = {}  # shared with the pair's other sublayer

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                layer_cache: torch.Tensor, meta: AttentionMetadata, cos_sin_cache: torch.Tensor | None,
                lora: LoraMeta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.attend(positions, x, residual, layer_cache, meta, cos_sin_cache, lora)
        h, residual = self.post_attention_layernorm(h, residual)
        out = self.feed_forward(h, lora)
        if self.shortcut is not None:
            self.carry["shortcut"] = self.shortcut(h)
            return out, residual
        return out + self.carry.pop("shortcut"), residual

    def quantize_fp8_(self) -> None:
        super().quantize_fp8_()
        if self.shortcut is not None:
            self.shortcut.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        if self.shortcut is not None:
            slots.update(self.shortcut.weight_slots(f"{prefix}.shortcut"))
        return slots


class LongcatFlashCausalLM(DeepseekCausalLM):
    layer_class = LongcatSublayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__(cfg, dtype, device)
        for first, second in zip(self.layers[0::2], self.layers[1::2]):
            second.carry = first.carry

    def _skipped(self, name: str) -> bool:
        return super()._skipped(name) or name.startswith("model.mtp.")  # transformers ignores model.mtp.*

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((_sublayer_name(name), tensor) for name, tensor in weights)


def _sublayer_name(name: str) -> str:
    """A checkpoint tensor's name as its sublayer's."""
    if m := _SUBLAYER.fullmatch(name):
        layer, part, sub, rest = m.groups()
        return f"model.layers.{2 * int(layer) + int(sub)}.{'mlp' if part == 'mlps' else part}.{rest}"
    if m := _SHORTCUT.fullmatch(name):
        layer, part, rest = m.groups()
        return f"model.layers.{2 * int(layer)}.shortcut.{_SHORTCUT_PARTS[part]}.{rest}"
    return name
