"""DBRX: the mixture-of-experts decoder of ``splitserve.engine.models.moe``
with float32 LayerNorms without bias and clamped q/k/v (``FamilyOptions``),
its checkpoint names mapped at load:

- ``transformer.wte`` / ``transformer.norm_f`` / ``transformer.blocks.N``
  -> ``model.embed_tokens`` / ``model.norm`` / ``model.layers.N``;
- ``norm_attn_norm.norm_1`` / ``norm_2`` -> ``input_layernorm`` /
  ``post_attention_layernorm``; ``norm_attn_norm.attn.out_proj`` ->
  ``self_attn.o_proj``; ``norm_attn_norm.attn.Wqkv`` (rows [q | k | v])
  split into ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``;
- ``ffn.router.layer`` -> ``mlp.gate``;
- ``ffn.experts.mlp.w1`` / ``v1`` / ``w2``, each [E * I, hidden] (expert e's
  rows [e * I, (e + 1) * I)): w1 is expert e's gate_proj, v1 its up_proj,
  and w2 its down_proj transposed (transformers multiplies ``x @ w2``).

Split by the full model's sizes (those a tensor-parallel rank would narrow
further), though tensor parallelism is refused for DBRX until a test covers
it (``FamilyOptions.tensor_parallel_refusal``).
LoRA adapters are refused: q/k/v are fused and every projection renamed.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.errors import CheckpointError
from splitserve.engine.models.mapped import MappedCausalLM, renamed
from splitserve.engine.models.moe import MoECausalLM

_PREFIXES = (("transformer.wte.", "model.embed_tokens."), ("transformer.norm_f.", "model.norm."),
             ("transformer.blocks.", "model.layers."))
_PARTS = ((".norm_attn_norm.norm_1.", ".input_layernorm."),
          (".norm_attn_norm.norm_2.", ".post_attention_layernorm."),
          (".norm_attn_norm.attn.out_proj.", ".self_attn.o_proj."),
          (".ffn.router.layer.", ".mlp.gate."))
# fused expert tensor -> (the per-expert projection, transposed)
_EXPERTS = {"w1": ("gate_proj", False), "v1": ("up_proj", False), "w2": ("down_proj", True)}


class DbrxCausalLM(MappedCausalLM, MoECausalLM):
    """DBRX (``DbrxForCausalLM``): fused q/k/v and experts split, names mapped at load."""

    lora_refusal = ("LoRA adapters are not supported for DBRX checkpoints (its q/k/v are fused in "
                    "Wqkv and its projections renamed)")

    def mapped(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        original, name = name, renamed(name, _PREFIXES, _PARTS)
        cfg = self.cfg if self.tp is None else self.tp.plan.cfg  # the whole model's sizes
        base, _, leaf = name.rpartition(".")
        if name.endswith(".norm_attn_norm.attn.Wqkv.weight"):
            layer = name.removesuffix(".norm_attn_norm.attn.Wqkv.weight")
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            self._check(original, tensor, (q + 2 * kv, cfg.hidden_size))
            parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]))
            return [(f"{layer}.self_attn.{proj}.weight", t) for proj, t in parts]
        if base.endswith(".ffn.experts.mlp") and leaf in _EXPERTS:
            e, i, h = cfg.moe.num_experts, cfg.moe.expert_intermediate_size, cfg.hidden_size
            self._check(original, tensor, (e * i, h))
            proj, transposed = _EXPERTS[leaf]
            layer = base.removesuffix(".ffn.experts.mlp")
            experts = tensor.view(e, i, h)
            return [(f"{layer}.mlp.experts.{j}.{proj}.weight", experts[j].T if transposed else experts[j])
                    for j in range(e)]
        return ((name, tensor),)

    @staticmethod
    def _check(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {name!r}: expected shape {list(shape)}, got {list(tensor.shape)}")
