"""GPT-NeoX (Pythia and kin): the dense decoder with LayerNorm, the ungated
GELU MLP, partial RoPE and, by default, the parallel residual with a norm
each for attention and MLP (``FamilyOptions``,
``splitserve.engine.family_config``).

Its checkpoints name things their own way; ``GPTNeoXCausalLM`` renames them
at load onto the shared decoder's slots: ``gpt_neox.embed_in`` ->
``model.embed_tokens``, ``gpt_neox.layers.N.attention`` ->
``model.layers.N.self_attn`` (``dense`` -> ``o_proj``),
``gpt_neox.final_layer_norm`` -> ``model.norm``, ``embed_out`` ->
``lm_head``; the MLP keeps ``dense_h_to_4h`` / ``dense_4h_to_h``. The fused
``query_key_value`` holds each head's q, k and v rows together
([head 0: q | k | v, head 1: ...]); it is split into q/k/v_proj by head.
Older exports' causal-mask buffers (``attention.bias``,
``attention.masked_bias``) are skipped.
"""

from __future__ import annotations

from typing import Iterator

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("gpt_neox.embed_in.", "model.embed_tokens."),
    ("gpt_neox.final_layer_norm.", "model.norm."),
    ("embed_out.", "lm_head."),
    ("gpt_neox.layers.", "model.layers."),
)
_LAYER_RENAMES = ((".attention.", ".self_attn."), (".self_attn.dense.", ".self_attn.o_proj."))
_MASK_BUFFERS = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")


class GPTNeoXCausalLM(MappedCausalLM):
    """GPT-NeoX (``GPTNeoXForCausalLM``): checkpoint names mapped at load."""

    def split_qkv(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg
        heads, d = cfg.num_heads, cfg.head_dim
        if tensor.dim() < 1 or tensor.shape[0] != 3 * heads * d:
            raise CheckpointError(f"tensor {name!r}: expected {3 * heads * d} rows "
                                  f"({heads} heads x q, k, v of {d}), got shape {list(tensor.shape)}")
        per_head = tensor.reshape(heads, 3, d, *tensor.shape[1:])
        parent, _, kind = name.rpartition(".")  # kind: weight | bias
        base = parent.rpartition(".")[0]
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            yield f"{base}.{part}.{kind}", per_head[:, i].reshape(heads * d, *tensor.shape[1:])

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(_MASK_BUFFERS):
            return
        name = renamed(name, _RENAMES, _LAYER_RENAMES)
        if ".self_attn.query_key_value." in name:
            yield from self.split_qkv(name, tensor)
        else:
            yield name, tensor
