"""nanochat (``NanoChatForCausalLM``), as transformers' ``modeling_nanochat``
computes it:

- every RMSNorm has no weight (the layers' two, the final one, the q/k norms):
  the shared decoder's norms are loaded with ones, which the checkpoint lacks;
- the token embeddings are RMS-normed before the first layer (by the same
  weightless norm as the final one);
- q and k are RMS-normed per head once rotated, without weight
  (``FamilyOptions.rope_qk_l2_norm``, Llama 4's ``Llama4Attention``);
- its RoPE turns the other way (its rotate_half gives ``(x2, -x1)``): negating
  the second half of each q/k head's rows at load makes the rotate-half kernels
  compute the same scores, q . k being unchanged when both are so negated and
  the weightless norms not minding signs; keys are cached in that form;
- the ungated MLP ``fc1 -> relu2 -> fc2`` (``PlainMLP``) and the final logits
  soft-capped (``final_logit_softcapping``).

fp8 checkpoints, LoRA adapters and tensor parallelism are refused (the dialect,
``lora_refusal``, ``FamilyOptions.tensor_parallel_refusal``).
"""

from __future__ import annotations

from itertools import chain
from typing import Iterable, Iterator

import torch

from splitserve.engine.models.gemma import soft_cap
from splitserve.engine.models.llama4 import Llama4DecoderLayer
from splitserve.engine.models.mapped import MappedCausalLM
from splitserve.engine.models.plain_blocks import PlainMLP

_ROTATED = ("q_proj", "k_proj")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def flip_rotation(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A q/k projection's weight [H*D, in] or bias [H*D] with the second half
    of each head's rows negated."""
    heads = tensor.reshape(tensor.shape[0] // head_dim, head_dim, *tensor.shape[1:]).clone()
    heads[:, head_dim // 2:] *= -1
    return heads.reshape(tensor.shape)


class NanoChatCausalLM(MappedCausalLM):
    """nanochat: weightless norms, a normed embedding, q/k rows flipped at load."""

    lora_refusal = ("LoRA adapters are not supported for nanochat checkpoints (its q/k rows are "
                    "negated at load and its MLP has no gate_proj)")

    def build_layer(self, index: int, window: int, dtype: torch.dtype,
                    device: torch.device | str) -> Llama4DecoderLayer:
        prefix = f"model.layers.{index}"
        mlp = PlainMLP(self.cfg, dtype, device, prefix=f"{prefix}.mlp")
        return Llama4DecoderLayer(self.cfg, dtype, device, window, mlp=mlp, prefix=prefix)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(super().embed(input_ids))[0]

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.options.final_softcap
        return logits if cap <= 0 else soft_cap(logits, cap)

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        module = name.rpartition(".")[0].rpartition(".")[2]
        d = self.cfg.head_dim
        if module in _ROTATED and tensor.dim() >= 1 and tensor.shape[0] % d == 0:
            tensor = flip_rotation(tensor, d)
        return ((name, tensor),)

    def unit_norms(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Ones for every norm weight of the shared decoder (nanochat's have none)."""
        for name, slot in self.weight_slots().items():
            if name.endswith(_NORMS) or name == "model.norm.weight":
                yield name, torch.ones(slot.target.shape)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(chain(weights, self.unit_norms()))

