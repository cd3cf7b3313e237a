"""K-EXAONE (``ExaoneMoeForCausalLM``): the mixture-of-experts decoder of
``splitserve.engine.models.moe`` with EXAONE 4's attention.

- Pre-norm layers (``DecoderLayer``), per-head q/k RMSNorms before RoPE
  (``Attention`` with ``ModelConfig.qk_norm``, as Qwen3).
- ``layer_types``: the sliding layers attend to the last ``sliding_window``
  tokens (``ModelConfig.layer_windows``); while a window is set the
  full-attention layers apply no RoPE (``FamilyOptions.nope_layers``, as
  SmolLM3's: their keys are cached unrotated).
- The sparse layers (``ModelConfig.moe``): DeepSeek-V3's grouped sigmoid
  router in float32 with its correction bias (``MoEConfig.grouped_sigmoid``)
  and an ungated shared MLP (``mlp.shared_experts``); the dense layers a
  SwiGLU MLP of ``intermediate_size``.
The checkpoint stores the router's correction bias beside the router
(``mlp.e_score_correction_bias``); it is loaded into the router's slot
(``mlp.gate.e_score_correction_bias``), as transformers renames it.
Multi-token-prediction tensors (``mtp.*``) are skipped at load, as
transformers skips them.
(``splitserve.engine.dialects.exaone_moe`` reads all of it from config.json.)
"""

from __future__ import annotations

from typing import Iterable

import torch

from splitserve.engine.models.moe import MoECausalLM
from splitserve.engine.models.smollm3 import SmolLM3CausalLM

_BIAS = (".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias")


class ExaoneMoeCausalLM(SmolLM3CausalLM, MoECausalLM):
    """K-EXAONE: the MoE decoder with SmolLM3's NoPE layers, the router's bias
    renamed and MTP tensors skipped at load."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name.replace(*_BIAS) if name.endswith(_BIAS[0]) else name, tensor)
                             for name, tensor in weights)

    def _skipped(self, name: str) -> bool:
        return super()._skipped(name) or "mtp" in name  # transformers ignores r"mtp.*"
