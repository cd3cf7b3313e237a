"""Helium: the Llama decoder with interleaved rotary pairs.

transformers' Helium rotates each head's dims in adjacent pairs (2i, 2i+1)
with frequency i, where the engine's rotary kernels pair i with i + D/2
(rotate-half). Reordering each query and key head's rows at load, even dims
first then odd ones (``deinterleave_heads``), turns the one into the other:
q . k is a sum over the same dims in another order, values are untouched,
so scores and outputs are transformers' while every kernel stays as it is.
Keys are cached in that order, which the prefix cache and the KV hand-off
carry like any other (both ends load the checkpoint the same way).

The rest, from its config.json (``splitserve.engine.family_config``):
RMSNorm multiplying the float32 weight into the float32 normed row
(``norm_fp32_product``), scores scaled by ``1 / math.sqrt(head_dim)``,
q/k/v biases per ``attention_bias`` and MLP biases per ``mlp_bias``, no
o_proj bias; o_proj maps hidden_size to hidden_size, so the heads must span
hidden_size exactly (``parse_family_options`` refuses other shapes). fp8 checkpoints and LoRA adapters are refused: their
q/k rows would need the same reordering.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.mapped import MappedCausalLM

_ROTATED = ("q_proj", "k_proj")


def deinterleave_heads(tensor: torch.Tensor, head_dim: int,
                       rotary_dim: int | None = None) -> torch.Tensor:
    """Rows of a q/k projection (weight [H*D, in] or bias [H*D]) reordered
    within each head: dims 0, 2, 4, ... then 1, 3, 5, ... of its first
    ``rotary_dim`` dims (None: all of them, Helium), the rest kept in place
    after them (GPT-J's partial rotary)."""
    rot = rotary_dim or head_dim
    rest = tensor.shape[1:]
    heads = tensor.reshape(tensor.shape[0] // head_dim, head_dim, *rest)
    turned = heads[:, :rot].reshape(heads.shape[0], rot // 2, 2, *rest).transpose(1, 2)
    turned = turned.reshape(heads.shape[0], rot, *rest)
    return torch.cat([turned, heads[:, rot:]], dim=1).reshape(tensor.shape)


class HeliumCausalLM(MappedCausalLM):
    """Helium (``HeliumForCausalLM``): q/k rows reordered at load (adapters' too)."""

    def adapter_rows(self, name: str, b: torch.Tensor) -> torch.Tensor:
        """q/k adapters' lora_B rows reordered as their weights' are at load."""
        return deinterleave_heads(b, self.cfg.head_dim, self.reordered_dims()) if name in _ROTATED else b

    def reordered_dims(self) -> int | None:
        """How many of each q/k head's first dims rotate in pairs (None: all of them)."""
        return None

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        d = self.cfg.head_dim
        module = name.rpartition(".")[0].rpartition(".")[2]
        if module in _ROTATED and tensor.dim() >= 1 and tensor.shape[0] % d == 0:
            tensor = deinterleave_heads(tensor, d, self.reordered_dims())
        return ((name, tensor),)  # a q/k tensor of the wrong shape fails in its slot, by name
