"""GLM (``GlmForCausalLM``): the Llama decoder with a fused MLP projection
and partial, interleaved RoPE.

- Each MLP's gate and up are stored as one ``gate_up_proj`` (rows
  [gate | up]); it is split at load as Phi-3's is (``Phi3CausalLM``).
- RoPE turns only each head's first ``rotary_dim`` dims
  (``partial_rotary_factor``), in adjacent pairs (2i, 2i+1); the rest pass
  through. Reordering those dims of each q/k head's rows at load, even ones
  first then odd (``deinterleave_rotary``), makes it the rotate-half
  rotation of the first ``rotary_dim`` dims that the kernels compute, with
  the same scores, as for Helium (``splitserve.engine.models.helium``).
- q/k/v biases per ``attention_bias``; no o_proj or MLP bias
  (``splitserve.engine.dialects.glm``).
LoRA adapters are refused: their q/k rows would need the same reordering.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.helium import deinterleave_heads
from splitserve.engine.models.lora_layers import LoraStack
from splitserve.engine.models.phi3 import Phi3CausalLM
from splitserve.engine.models.rope import rotary_dim

_ROTATED = ("q_proj", "k_proj")


def deinterleave_rotary(tensor: torch.Tensor, head_dim: int, rotary: int) -> torch.Tensor:
    """Rows of a q/k projection (weight [H*D, in] or bias [H*D]) with each
    head's first ``rotary`` rows reordered (even ones, then odd), the rest kept."""
    rest = tensor.shape[1:]
    heads = tensor.reshape(tensor.shape[0] // head_dim, head_dim, *rest)
    turned = deinterleave_heads(heads[:, :rotary].reshape(-1, *rest), rotary)
    return torch.cat([turned.reshape(heads.shape[0], rotary, *rest), heads[:, rotary:]], 1).reshape(tensor.shape)


class GlmCausalLM(Phi3CausalLM):
    """GLM (``GlmForCausalLM``): q/k rows reordered, gate_up_proj split at load."""

    def _reordered(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        d, rot = self.cfg.head_dim, rotary_dim(self.cfg)
        for name, tensor in weights:
            module = name.rpartition(".")[0].rpartition(".")[2]
            if module in _ROTATED and tensor.dim() >= 1 and tensor.shape[0] % d == 0:
                tensor = deinterleave_rotary(tensor, d, rot)
            yield name, tensor  # a q/k tensor of the wrong shape fails in its slot, by name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._reordered(weights))

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for GLM checkpoints (its q/k rows "
                              "are reordered at load; adapters' would need the same)")
