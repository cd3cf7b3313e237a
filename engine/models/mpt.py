"""MPT (``MptForCausalLM``): the dense decoder with bias-free LayerNorms
(``FloatLayerNorm`` with a weight: float32 math rounded once, as torch's
LayerNorm computes 16-bit rows), the ungated exact-GELU MLP, no biases and
ALiBi in place of RoPE (``FamilyOptions``, from
``splitserve.engine.dialects.mpt``), one KV head per query head.

Its checkpoints name things their own way; ``MptCausalLM`` renames them at
load onto the shared decoder's slots: ``transformer.wte`` ->
``model.embed_tokens``, ``transformer.blocks.N`` -> ``model.layers.N``
(``norm_1`` / ``norm_2`` -> ``input_layernorm`` /
``post_attention_layernorm``, ``attn`` -> ``self_attn``, its ``out_proj``
-> ``o_proj``, ``ffn`` -> ``mlp``, which keeps ``up_proj`` / ``down_proj``),
``transformer.norm_f`` -> ``model.norm``. The fused ``attn.Wqkv`` holds
[q | k | v] along its output dim, as transformers chunks it, and is split
into q/k/v_proj. The LM head is tied to ``wte`` unless config.json says
otherwise.

LoRA adapters on ``Wqkv``, ``out_proj``, ``up_proj`` and ``down_proj``
are served, ``Wqkv``'s lora_B split as the weight
(``splitserve.engine.lora.mapped_layout``). Tensor
parallelism splits it as Llama's decoder (q/k/v_proj by head, the MLP by
its width, the norms whole), each rank with its heads' ALiBi slopes.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.norm_f.", "model.norm."),
    ("transformer.blocks.", "model.layers."),
)
_LAYER_RENAMES = ((".norm_1.", ".input_layernorm."), (".norm_2.", ".post_attention_layernorm."),
                  (".attn.out_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."),
                  (".ffn.", ".mlp."))


class MptCausalLM(MappedCausalLM):
    """MPT (``MptForCausalLM``): checkpoint names mapped, ``Wqkv`` split at load."""

    def split_qkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``Wqkv.weight`` ([q | k | v] rows) -> q_proj, k_proj and v_proj's."""
        hidden = self.cfg.hidden_size
        if tensor.dim() != 2 or tensor.shape[0] != 3 * hidden:
            raise CheckpointError(f"tensor {name!r}: expected {3 * hidden} rows (q, k, v of "
                                  f"{hidden}), got shape {list(tensor.shape)}")
        base, _, kind = name.rpartition(".Wqkv.")
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.split(hidden)):
            yield f"{base}.{part}.{kind}", rows

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        name = renamed(name, _RENAMES, _LAYER_RENAMES)
        if ".self_attn.Wqkv." in name:
            yield from self.split_qkv(name, tensor)
        else:
            yield name, tensor
