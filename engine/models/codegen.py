"""CodeGen (``CodeGenForCausalLM``): GPT-J's model
(``splitserve.engine.models.gptj``: names mapped, q/k rows reordered at
load for its interleaved partial RoPE, the parallel block) with one fused
``attn.qkv_proj`` [3 * n_embd, n_embd] split at load.

transformers' ``CodeGenAttention`` views the projection's output as
``mp_num`` = 4 shards of 3 * n_embd / 4 each, and each shard as
[query | value | key] parts of n_embd / 4; the query is the shards' query
parts in shard order (then split into heads), and so are the value and the
key. So the weight, viewed as [4, 3, n_embd / 4, n_embd], holds q_proj in
[:, 0], v_proj in [:, 1] and k_proj in [:, 2], each reshaped to
[n_embd, n_embd]; they then go through GPT-J's mapping as GPT-J's own
q/k/v_proj do. Older exports' ``attn.causal_mask`` buffers are skipped.
LoRA adapters' qkv_proj lora_B rows take the same split
(``splitserve.engine.lora.mapped_layout``), then GPT-J's reordering.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.dialects.codegen import MP_NUM
from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.gptj import GPTJCausalLM

_FUSED = ".attn.qkv_proj.weight"
_MASK_BUFFERS = (".attn.causal_mask",)
_PARTS = ("q_proj", "v_proj", "k_proj")  # each shard's order


class CodeGenCausalLM(GPTJCausalLM):
    """CodeGen (``CodeGenForCausalLM``): the fused qkv_proj split, then GPT-J's mapping."""

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.endswith(_MASK_BUFFERS):
            return ()
        if not name.endswith(_FUSED):
            return super().mapped(name, tensor)
        e = self.cfg.hidden_size
        if tuple(tensor.shape) != (3 * e, e):
            raise CheckpointError(f"tensor {name!r}: expected shape {[3 * e, e]}, got {list(tensor.shape)}")
        parts = tensor.view(MP_NUM, 3, e // MP_NUM, e)
        base = name.removesuffix("qkv_proj.weight")
        pairs = []
        for i, part in enumerate(_PARTS):
            pairs.extend(super().mapped(f"{base}{part}.weight", parts[:, i].reshape(e, e)))
        return pairs
