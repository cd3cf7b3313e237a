"""Liquid LFM2-MoE (``Lfm2MoeForCausalLM``, transformers' ``lfm2_moe``):
its config.json in Llama's keys, and its ``FamilyOptions``.

LFM2 (``splitserve.engine.dialects.lfm2``: short convolutions beside
attention layers, the same norms, names and RoPE base) with, as
transformers' Lfm2MoeConfig and its model read it:

- ``layer_types`` required (``conv`` / ``full_attention``; Lfm2MoeConfig
  derives none and transformers cannot build the model without it);
- the first ``num_dense_layers`` (2) layers a SwiGLU MLP of
  ``intermediate_size`` (7168, not adjusted), the rest ``num_experts`` (32)
  SwiGLU experts of ``moe_intermediate_size`` (1792), ``num_experts_per_tok``
  (4) chosen by the sigmoid of the router logits plus, with
  ``use_expert_bias`` (on), a learned per-expert bias (for choosing only),
  weighted by their unbiased sigmoid scores divided by their sum (+ 1e-6)
  with ``norm_topk_prob`` (on), times ``routed_scaling_factor`` (1.0).

Refused: as LFM2 refuses, and fp8 checkpoints (renamed tensors).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.lfm2 import common_keys, layer_kinds, lfm2_options
from splitserve.engine.family_config import FamilyOptions

ARCH = "Lfm2MoeForCausalLM"
# keys read as Llama's, with transformers' Lfm2MoeConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 65536, "hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128_000,
           "head_dim": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "bos_token_id": 1, "eos_token_id": 2}
_MOE_DEFAULTS = {"num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 1792,
                 "norm_topk_prob": True, "routed_scaling_factor": 1.0, "num_dense_layers": 2,
                 "use_expert_bias": True}


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _merged(cfg)
    out = common_keys(cfg, _PASSED)
    dense = int(full["num_dense_layers"])
    if dense < 0:
        raise ValueError(f"num_dense_layers must not be negative, got {dense}")
    out.update(attention_bias=False, num_experts=int(full["num_experts"]),
               num_experts_per_tok=int(full["num_experts_per_tok"]),
               moe_intermediate_size=int(full["moe_intermediate_size"]),
               norm_topk_prob=bool(full["norm_topk_prob"]), decoder_sparse_step=1,
               mlp_only_layers=list(range(dense)), shared_expert_intermediate_size=0,
               moe_routing={"routed_scaling_factor": float(full["routed_scaling_factor"])})
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed at load")
    if cfg.get("layer_types") is None:
        raise ValueError("layer_types is required for lfm2_moe (Lfm2MoeConfig derives none)")
    full = _merged(cfg)
    kinds = layer_kinds(cfg, int(full["num_hidden_layers"]))
    return FamilyOptions(**lfm2_options(full, "lfm2_moe", kinds, 3,
                                        expert_bias=bool(full["use_expert_bias"])))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
