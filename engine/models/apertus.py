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
are refused: the MLP has no gate_proj and takes none.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.config import ModelConfig
from splitserve.engine.models.decoder_layer import DecoderLayer
from splitserve.engine.models.layers import Linear, ShardSlot, empty_param, linear_slots
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.quantization import layer_groups

_RENAMES = ((".attention_layernorm.", ".input_layernorm."),
            (".feedforward_layernorm.", ".post_attention_layernorm."))
_SCALARS = ("alpha_p", "alpha_n", "beta", "eps")


class XieluMLP(nn.Module):
    """``down_proj(xielu(up_proj(x)))``, no biases; the activation's scalars
    are this layer's ``act_fn.alpha_p`` / ``alpha_n`` / ``beta`` / ``eps``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, prefix: str):
        super().__init__()
        self.quant = cfg.quantization
        hidden, i = cfg.hidden_size, cfg.intermediate_size
        self.up_proj = Linear(hidden, i, False, dtype, device, fp8_groups=layer_groups(
            self.quant, [(f"{prefix}.up_proj.weight", i)], hidden))
        self.down_proj = Linear(i, hidden, False, dtype, device, fp8_groups=layer_groups(
            self.quant, [(f"{prefix}.down_proj.weight", hidden)], i))
        for name in _SCALARS:
            setattr(self, name, empty_param(1, dtype=dtype, device=device))

    def xielu(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.xielu(self.up_proj(x)))

    def quantize_fp8_(self) -> None:
        self.up_proj.quantize_fp8_()
        self.down_proj.quantize_fp8_()

    def weight_slots(self, prefix: str) -> dict[str, ShardSlot]:
        slots = linear_slots(self.up_proj, [(f"{prefix}.up_proj", 0, self.up_proj.out_features)], self.quant)
        slots.update(linear_slots(self.down_proj, [(f"{prefix}.down_proj", 0, self.down_proj.out_features)],
                                  self.quant))
        slots.update({f"{prefix}.act_fn.{name}": ShardSlot(getattr(self, name)) for name in _SCALARS})
        return slots


class ApertusCausalLM(MappedCausalLM):
    """Apertus (``ApertusForCausalLM``): ``XieluMLP`` layers, norms renamed at load."""

    lora_refusal = ("LoRA adapters are not supported for Apertus checkpoints (its ungated MLP takes "
                    "none)")

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        return DecoderLayer(self.cfg, dtype, device, window, prefix=prefix,
                            mlp=XieluMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp"))

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.rpartition(".")[2] in _SCALARS and ".act_fn." in name and tensor.numel() == 1:
            tensor = tensor.reshape(1)
        return ((renamed(name, (), _RENAMES), tensor),)
