"""Kolibri (``Kolibri1ForCausalLM``): EXAONE 4's attention in GLM-4's
sandwich layers, with experts in every layer.

- Attention (``Attention`` with ``ModelConfig.qk_norm``): per-head q/k
  RMSNorms before RoPE; windows on the layers ``layer_types`` marks
  sliding (``ModelConfig.layer_windows``), no RoPE on the others while a
  window is set (``FamilyOptions.nope_layers``, SmolLM3's table-less layers).
- Layers (``Glm4DecoderLayer``): ``x + post_self_attn(attn(input(x)))``,
  then ``x + post_mlp(moe(post_attention(x)))``.
- Experts (``Kolibri1MoeBlock``, transformers' ``Kolibri1TopKRouter``): in
  float32, the top-k of the router logits plus ``e_score_correction_bias``
  choose; the chosen logits' sigmoids weigh, divided by their sum with
  ``norm_topk_prob``; an ungated shared MLP is added.

The checkpoint names map at load as transformers renames them:
``post_attn_norm`` -> ``post_self_attn_layernorm``, ``post_ffn_norm`` ->
``post_mlp_layernorm``, ``moe.router.expert_bias`` ->
``mlp.gate.e_score_correction_bias`` (checkpoints already in the latter
names load too). (``splitserve.engine.dialects.kolibri1`` reads config.json.)
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.glm4 import Glm4DecoderLayer
from splitserve.engine.models.layers import Linear, empty_param
from splitserve.engine.models.moe import MoECausalLM, SparseMoeBlock
from splitserve.engine.models.smollm3 import SmolLM3CausalLM

# released checkpoint name -> transformers' module name
_RENAMES = ((".post_attn_norm.", ".post_self_attn_layernorm."),
            (".post_ffn_norm.", ".post_mlp_layernorm."),
            (".moe.router.expert_bias", ".mlp.gate.e_score_correction_bias"))


class Kolibri1MoeBlock(SparseMoeBlock):
    """``SparseMoeBlock`` routed as ``Kolibri1TopKRouter``: a float32 router and its bias."""

    def __init__(self, cfg, dtype: torch.dtype, device: torch.device | str, prefix: str = "mlp"):
        super().__init__(cfg, dtype, device, prefix=prefix)
        h, e = cfg.hidden_size, cfg.moe.num_experts
        self.gate = Linear(h, e, False, torch.float32, device)
        self.e_score_correction_bias = empty_param(e, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> float32 logits [T, E] -> K experts per token -> [T, hidden]
        weights, ids = route_biased_logits(self.gate(x.float()), self.e_score_correction_bias, self.top_k,
                                           self.renormalize)
        return self.run_experts(x, weights, ids) + self.shared_expert(x)


def route_biased_logits(logits: torch.Tensor, bias: torch.Tensor, top_k: int,
                        renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``Kolibri1TopKRouter``: float32 logits [T, E] plus ``bias`` [E] choose the
    ``top_k``; the chosen logits' sigmoids (divided by their sum with
    ``renormalize``) weigh -> (weights [T, K] float32, expert ids [T, K] int64)."""
    ids = torch.topk(logits + bias, top_k, dim=-1)[1]
    weights = logits.gather(1, ids).sigmoid()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Kolibri1CausalLM(SmolLM3CausalLM, MoECausalLM):
    """Kolibri: ``Glm4DecoderLayer`` layers holding ``Kolibri1MoeBlock``, no RoPE table for
    the NoPE layers, the released checkpoint names mapped at load."""

    layer_class = Glm4DecoderLayer
    moe_block_class = Kolibri1MoeBlock

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((_renamed(name), tensor) for name, tensor in weights)


def _renamed(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name
