"""Cohere (Command-R): the parallel-residual decoder with float32 LayerNorms,
interleaved RoPE pairs and scaled logits.

- Each layer is ``x + attn(norm(x)) + mlp(norm(x))`` on one
  ``input_layernorm`` (``ParallelDecoderLayer``), the MLP gated (SwiGLU);
  the norms are LayerNorms with a weight and no bias, computed in float32
  (``FloatLayerNorm``, ``FamilyOptions.float_layer_norm``).
- RoPE rotates adjacent dim pairs as Helium's does: q/k rows are reordered
  at load (``HeliumCausalLM``, ``deinterleave_heads``).
- ``use_qk_norm``: each head's q and k LayerNorm-ed over its head_dim with
  that head's own weight (``[heads, head_dim]`` in checkpoints), before
  RoPE (``CohereAttention``). The weights' columns get the q/k rows' order;
  with tensor parallelism each rank loads its heads' rows.
- The logits are multiplied by ``logit_scale`` in the model dtype.
LoRA adapters are refused, as for Helium: their q/k rows would need the
same reordering.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.float_layer_norm import FloatLayerNorm
from splitserve.engine.models.helium import HeliumCausalLM, deinterleave_heads
from splitserve.engine.models.layers import Attention
from splitserve.engine.models.plain_blocks import ParallelDecoderLayer

_HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


class CohereAttention(Attention):
    """``Attention`` whose q/k norms (``FamilyOptions.head_qk_layer_norm``)
    are float32 LayerNorms with a weight per head, and whose RoPE rotates
    float32 copies of q and k (rounded once, as transformers' Cohere does)."""

    float_rope = True

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int = 0, prefix: str = "self_attn"):
        super().__init__(cfg, dtype, device, sliding_window, prefix=prefix)
        if cfg.options.head_qk_layer_norm:
            eps, d = cfg.rms_norm_eps, self.head_dim
            self.q_norm = FloatLayerNorm((self.num_heads, d), eps, dtype, device, cohere=True)
            self.k_norm = FloatLayerNorm((self.num_kv_heads, d), eps, dtype, device, cohere=True)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, Hq, D], k [T, Hk, D]: each head over its D dims, times its own weight row
        return self.q_norm(q)[0], self.k_norm(k)[0]


class CohereDecoderLayer(ParallelDecoderLayer):
    """The parallel residual on one norm, with ``CohereAttention``, summed as
    transformers sums it: ``(x + attn) + mlp``."""

    attention_class = CohereAttention
    attn_into_residual = True


class CohereCausalLM(HeliumCausalLM):
    """Cohere (``CohereForCausalLM``): ``CohereDecoderLayer`` layers, q/k rows
    and per-head norm weights reordered at load, scaled logits."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        return CohereDecoderLayer(self.cfg, dtype, device, window, prefix=f"model.layers.{index}")

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.cfg.options.logit_scale

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        # [heads, D] q/k norm weights: columns in the q/k rows' order, and with
        # tensor parallelism the rank's heads only
        d = self.cfg.head_dim
        if name.endswith(_HEAD_NORMS) and tensor.dim() == 2 and tensor.shape[1] == d:
            tensor = deinterleave_heads(tensor.reshape(-1), d).reshape(tensor.shape)
            if self.tp is not None:
                start, end = self.tp.plan.q_heads() if ".q_norm." in name else self.tp.plan.kv_heads()
                tensor = tensor[start:end]
        return super().mapped(name, tensor)  # one of the wrong shape fails in its slot, by name
