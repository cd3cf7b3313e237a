"""Apertus: the Llama decoder with per-head q/k norms and an ungated MLP
whose activation is xIELU, with learned scalars in every layer.

transformers' XIELUActivation (its Python path; the optional CUDA kernel
of the ``xielu`` package reads ``beta`` and ``eps`` from the config
instead of the checkpoint, and is not the reference here) computes, with
the layer's ``alpha_p``, ``alpha_n``, ``beta`` and ``eps``::

    ap = softplus(alpha_p); an = beta + softplus(alpha_n)
    x > 0:  ap * x * x + beta * x
    else:   (expm1(min(x, eps)) - x) * an + beta * x

``XieluMLP`` does the same ops in the same order. Checkpoints name the
layer norms ``attention_layernorm`` / ``feedforward_layernorm``; they are
renamed at load onto the shared decoder's slots, and the four scalars
(``mlp.act_fn.*``, stored as shape [1] or []) are read as shape [1].
Projections keep Llama's names, so tensor parallelism splits up_proj and
down_proj as any MLP's (the scalars whole on every rank). LoRA adapters
take the attention projections and the MLP's up_proj / down_proj.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import ShardSlot, empty_param
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.models.plain_blocks import PlainMLP

_RENAMES = ((".attention_layernorm.", ".input_layernorm."),
            (".feedforward_layernorm.", ".post_attention_layernorm."))
_SCALARS = ("alpha_p", "alpha_n", "beta", "eps")


class XieluMLP(PlainMLP):
    """``down_proj(xielu(up_proj(x)))``, no biases; the activation's scalars
    are this layer's ``act_fn.alpha_p`` / ``alpha_n`` / ``beta`` / ``eps``.
    LoRA on up_proj / down_proj as ``PlainMLP``'s."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__(cfg, dtype, device, prefix, act=self.xielu)
        for name in _SCALARS:
            setattr(self, name, empty_param(1, dtype=dtype, device=device))

    def xielu(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = super().weight_slots(prefix)
        slots.update({f"{prefix}.act_fn.{name}": ShardSlot(getattr(self, name)) for name in _SCALARS})
        return slots


class ApertusCausalLM(MappedCausalLM):
    """Apertus (``ApertusForCausalLM``): ``XieluMLP`` layers, norms renamed at load."""

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        return DecoderLayer(self.cfg, dtype, device, window, prefix=prefix,
                            mlp=XieluMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp"))

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.rpartition(".")[2] in _SCALARS and ".act_fn." in name and tensor.numel() == 1:
            tensor = tensor.reshape(1)
        return ((renamed(name, (), _RENAMES), tensor),)
