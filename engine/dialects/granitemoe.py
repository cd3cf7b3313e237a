"""GraniteMoE (``GraniteMoeForCausalLM``) and GraniteMoeShared
(``GraniteMoeSharedForCausalLM``): Granite's decoder with a sparse MLP in
every layer, read from config.json as transformers' ``GraniteMoeConfig`` /
``GraniteMoeSharedConfig`` do.

- Granite's four scalars (``embedding_multiplier``, ``attention_multiplier``,
  ``residual_multiplier``, ``logits_scaling``; each 1.0 when absent), as
  ``splitserve.engine.family_config`` reads Granite's;
- ``intermediate_size`` is each expert's; ``num_local_experts`` (default 8)
  experts, ``num_experts_per_tok`` (default 2) per token. transformers takes
  the top k router logits and a softmax over those k: the same weights as a
  softmax over all experts renormalised over the k (``norm_topk_prob``);
- GraniteMoeShared: a dense SwiGLU MLP of ``shared_intermediate_size``
  (0: none, the default) beside the experts in every layer, its output
  added to theirs. It is read as the Llama-style ``intermediate_size`` (the
  dense MLP's size; no layer here has another dense MLP), which tensor
  parallelism splits as it splits any dense MLP;
- ``attention_bias`` covers q/k/v and o_proj; the experts have no biases.

Checkpoints store each layer's experts fused (``block_sparse_moe.input_linear``
[E, 2I, hidden], ``output_linear`` [E, hidden, I], router
``block_sparse_moe.router.layer``); ``splitserve.engine.models.granitemoe``
splits them at load. fp8 checkpoints of these fused tensors are refused
(``weight_dtype: fp8`` quantizes an unquantized checkpoint at load instead).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.moe_keys import checked_activation, without_window_keys
from splitserve.engine.family_config import FamilyOptions, parse_family_options


def _llama_keys(cfg: dict[str, Any], shared: bool) -> dict[str, Any]:
    refuse_fp8_checkpoint(cfg, "GraniteMoE", "fused input_linear / output_linear experts")
    return {
        **without_window_keys(cfg),
        "qk_norm": False,
        "attention_out_bias": bool(cfg.get("attention_bias", False)),  # o_proj's, as q/k/v's
        "mlp_bias": False,
        "num_experts": int(cfg.get("num_local_experts") or 8),
        "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 2),
        "moe_intermediate_size": int(cfg["intermediate_size"]),
        "norm_topk_prob": True,
        # GraniteMoeShared: the shared MLP's size (GraniteMoE keeps the experts', as Mixtral)
        **({"intermediate_size": int(cfg.get("shared_intermediate_size") or 0)} if shared else {}),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    # Granite's multipliers, read as for Granite
    granite = parse_family_options({**cfg, "hidden_act": "silu"}, "granite")
    return dataclasses.replace(granite, hidden_act=checked_activation(cfg, "granitemoe"))


DIALECT = Dialect(architectures=("GraniteMoeForCausalLM",),
                  llama_keys=lambda cfg: _llama_keys(cfg, shared=False), options=options)
SHARED_DIALECT = Dialect(architectures=("GraniteMoeSharedForCausalLM",),
                         llama_keys=lambda cfg: _llama_keys(cfg, shared=True), options=options)
