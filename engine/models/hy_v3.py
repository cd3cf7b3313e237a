"""Tencent Hy3 (``HYV3ForCausalLM``): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with everything else from ``ModelConfig``
(``splitserve.engine.dialects.hy_v3``): per-head q/k RMSNorms before RoPE
(``ModelConfig.qk_norm``), GLM-4.5's sigmoid router with a correction bias
as one group of experts (``MoEConfig.grouped_sigmoid``), an ungated shared
MLP (``mlp.shared_mlp``) and dense layers by ``mlp_layer_types``.

What this class adds: the checkpoint stores the router as
``mlp.router.gate.weight`` and its correction bias as ``mlp.expert_bias``;
both are loaded into the router's slots (``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``), as transformers renames them. Its
multi-token-prediction layer, stored after the last decoder layer, is
skipped at load (``Glm4MoeCausalLM``), as transformers skips it.
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.glm4_moe import Glm4MoeCausalLM

# checkpoint name ending -> the router slot's (transformers' conversion mapping for hy_v3)
_RENAMED = ((".mlp.router.gate.weight", ".mlp.gate.weight"),
            (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"))


def _router_name(name: str) -> str:
    for old, new in _RENAMED:
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


class HYV3CausalLM(Glm4MoeCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((_router_name(name), tensor) for name, tensor in weights)
