"""GPT-J: the dense decoder with LayerNorm, the ungated MLP, the parallel
residual on one norm, an lm_head bias (``FamilyOptions`` from
``splitserve.engine.dialects.gptj``) and RoPE on adjacent dim pairs of each
head's first ``rotary_dim`` dims.

transformers' GPT-J rotates pairs (2i, 2i+1) of the first ``rotary_dim``
dims with frequency i (``rotate_every_two``) and passes the rest through.
The engine's rotary kernels turn pairs (i, i + rotary_dim/2) of a head's
first dims; reordering each query and key head's rotated rows at load,
even ones first then odd ones, the passed rows kept after them
(``deinterleave_heads``, as Helium's over a whole head), makes the one the
other without touching a kernel: q . k sums the same products in another
order and values are untouched.

Checkpoint names are mapped at load onto the shared decoder's:
``transformer.wte`` -> ``model.embed_tokens``, ``transformer.h.N`` ->
``model.layers.N``, ``ln_1`` -> ``input_layernorm``, ``attn`` ->
``self_attn`` (``out_proj`` -> ``o_proj``), ``transformer.ln_f`` ->
``model.norm``; the MLP keeps ``fc_in`` / ``fc_out``. Older exports'
causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are skipped.
LoRA adapters are served (``splitserve.engine.lora.mapped_layout``), their
q/k lora_B rows reordered as the weights' (``adapter_rows``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.helium import deinterleave_heads
from splitserve.engine.models.mapped import MappedCausalLM, renamed

_RENAMES = (  # checkpoint prefix -> the shared decoder's (first match wins)
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.ln_f.", "model.norm."),
    ("transformer.h.", "model.layers."),
)
_LAYER_RENAMES = ((".attn.out_proj.", ".self_attn.o_proj."), (".attn.", ".self_attn."),
                  (".ln_1.", ".input_layernorm."))
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_ROTATED = (".self_attn.q_proj.", ".self_attn.k_proj.")


class GPTJCausalLM(MappedCausalLM):
    """GPT-J (``GPTJForCausalLM``): names mapped, q/k rows reordered at load."""

    def adapter_rows(self, name: str, b: torch.Tensor) -> torch.Tensor:
        """q/k adapters' lora_B rows reordered as their weights' are at load."""
        if name in ("q_proj", "k_proj"):
            return deinterleave_heads(b, self.cfg.head_dim, self.cfg.options.rotary_dim)
        return b

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if name.endswith(_MASK_BUFFERS):
            return ()
        name, d = renamed(name, _RENAMES, _LAYER_RENAMES), self.cfg.head_dim
        if any(r in name for r in _ROTATED) and tensor.dim() >= 1 and tensor.shape[0] % d == 0:
            tensor = deinterleave_heads(tensor, d, self.cfg.options.rotary_dim)
        return ((name, tensor),)  # a q/k tensor of the wrong shape fails in its slot, by name
