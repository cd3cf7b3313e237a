"""OPT: the dense decoder with LayerNorm, the ungated MLP (``fc1`` / ``fc2``,
ReLU by default) and a learned absolute position table whose first two
rows are unused (position p is row p + 2), in place of RoPE
(``FamilyOptions``, from ``splitserve.engine.dialects.opt``).

Its checkpoints' names are mapped at load onto the shared decoder's slots:
``model.decoder.embed_tokens`` / ``embed_positions`` -> ``model.*``,
``model.decoder.layers.N`` -> ``model.layers.N`` (``self_attn_layer_norm``
/ ``final_layer_norm`` -> ``input_layernorm`` /
``post_attention_layernorm``, ``fc1`` / ``fc2`` -> ``mlp.fc1`` /
``mlp.fc2``; the attention keeps ``q/k/v_proj`` and ``out_proj``),
``model.decoder.final_layer_norm`` -> ``model.norm``. Exports of the bare
``OPTModel`` (the original facebook/opt checkpoints) carry the same names
without ``model.``. The LM head is tied to the token embeddings by default.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.llama import CausalLM
from splitserve.engine.models.lora_layers import LoraStack

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("decoder.final_layer_norm.", "model.norm."),
    ("decoder.layers.", "model.layers."),
    ("decoder.", "model."),  # embed_tokens, embed_positions
)
_LAYER_RENAMES = ((".self_attn_layer_norm.", ".input_layernorm."),
                  (".final_layer_norm.", ".post_attention_layernorm."),
                  (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."))


class OPTCausalLM(CausalLM):
    """OPT (``OPTForCausalLM``): checkpoint names mapped at load."""

    def renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            bare = name.removeprefix("model.")
            for old, new in _RENAMES:
                if bare.startswith(old):
                    name = new + bare[len(old):]
                    break
            if name.startswith("model.layers."):
                for old, new in _LAYER_RENAMES:
                    name = name.replace(old, new, 1)
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.renamed(weights))

    def enable_lora(self, num_slots: int, max_rank: int) -> dict[tuple[int, str], tuple[LoraStack, int]]:
        raise CheckpointError("LoRA adapters are not supported for OPT checkpoints (its projections "
                              "sit under model.decoder.layers, which adapters do not map onto)")
