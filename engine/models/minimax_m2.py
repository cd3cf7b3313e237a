"""MiniMax-M2 (``MiniMaxM2ForCausalLM``): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with everything else from ``ModelConfig``
(``splitserve.engine.dialects.minimax_m2``): GLM-4.5's sigmoid router with
a correction bias as one group of experts (``MoEConfig.grouped_sigmoid``),
q/k norms over all heads, partial rotate-half RoPE. Experts are named as
Mixtral's (``block_sparse_moe.experts.3.w1``).

What this class adds: the checkpoint stores the router's correction bias
beside the router (``block_sparse_moe.e_score_correction_bias``); it is
loaded into the router's slot (``block_sparse_moe.gate.e_score_correction_bias``)."""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.moe import MoECausalLM

_BIAS = (".block_sparse_moe.e_score_correction_bias", ".block_sparse_moe.gate.e_score_correction_bias")


class MiniMaxM2CausalLM(MoECausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(*_BIAS) if name.endswith(_BIAS[0]) else name, tensor)
                             for name, tensor in weights)
