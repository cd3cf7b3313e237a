"""K-EXAONE (``ExaoneMoeForCausalLM``): its config.json in Llama's keys, and
its ``FamilyOptions``.

As transformers' ExaoneMoeConfig and its model read it:

- EXAONE 4's attention (``splitserve.engine.dialects.exaone4``): per-head
  q/k RMSNorms before RoPE, ``layer_types`` (or every
  ``sliding_window_pattern``-th layer full, default 4), the sliding layers
  over ``sliding_window`` (4096) tokens, the full-attention layers without
  RoPE while a window is set; no biases anywhere;
- but pre-norm layers, as OLMoE's (``input_layernorm`` before attention,
  ``post_attention_layernorm`` before the MLP), not EXAONE 4's post-norms;
- DeepSeek-V3's mixture of experts (``splitserve.engine.dialects.glm4_moe``'s
  grouped sigmoid router with its correction bias, float32):
  ``num_experts`` (64) experts of ``moe_intermediate_size`` (1024),
  ``num_experts_per_tok`` (8), ``n_group`` / ``topk_group`` (1),
  ``norm_topk_prob`` (on), ``routed_scaling_factor`` (2.5); one ungated
  shared MLP of ``moe_intermediate_size * num_shared_experts`` (1);
- ``mlp_layer_types`` marks each layer ``dense`` (an MLP of
  ``intermediate_size``) or ``sparse``; without it the first
  ``first_k_dense_replace`` (1) layers are dense;
- ``head_dim`` as written, else hidden_size / num_attention_heads; eps
  1e-5, untied embeddings, 32 KV heads, RoPE base 10000 by default.

Multi-token-prediction tensors (``mtp.*``) are skipped at load, as
transformers skips them. Refused: activations other than SiLU, uneven
router groups, ``mlp_layer_types`` other than dense/sparse, fp8
checkpoints (untested: the float32 router beside fp8 experts), tensor
parallelism (untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects import exaone4
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' ExaoneMoeConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": 1, "eos_token_id": 53,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 2048}
# ExaoneMoeConfig's mixture-of-experts defaults, in GLM-4.5's keys (moe_keys reads them)
_MOE_DEFAULTS = {"num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 1024,
                 "num_shared_experts": 1, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1}


def mlp_layer_types(cfg: dict[str, Any], family: str, first_dense: int) -> list[str]:
    """``mlp_layer_types``, else the first ``first_k_dense_replace`` (default
    ``first_dense``) layers dense and the rest sparse."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("mlp_layer_types")
    if types is None:
        first = int(cfg.get("first_k_dense_replace", first_dense) or 0)
        return ["dense" if i < first else "sparse" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"mlp_layer_types has {len(types)} entries for {n} layers")
    unknown = set(types) - {"dense", "sparse"}
    if unknown:
        raise ValueError(f"mlp_layer_types {sorted(unknown)} are not supported for {family}; "
                         "supported: dense, sparse")
    return list(types)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    merged = {**_PASSED, **_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    routed = moe_keys({**merged, "n_routed_experts": merged["num_experts"],
                       "n_shared_experts": merged["num_shared_experts"]},
                      "exaone_moe", first_dense=1, norm_topk=True)
    dense = mlp_layer_types(merged, "exaone_moe", first_dense=1)
    routed["mlp_only_layers"] = [i for i, t in enumerate(dense) if t == "dense"]
    out = passed_keys(cfg, _PASSED)
    window = exaone4.window(cfg)
    out.update(routed, attention_bias=False, mlp_bias=False, qk_norm=True,
               use_sliding_window=window is not None, sliding_window=window,
               layer_types=exaone4.layer_types({**out, **cfg}, "exaone_moe"))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "ExaoneMoeForCausalLM", "untested: the float32 router and its "
                          "correction bias beside fp8 experts")
    types = exaone4.layer_types({**passed_keys(cfg, _PASSED), **cfg}, "exaone_moe")
    # transformers rotates a layer when sliding_window is None or the layer slides
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    nope = () if exaone4.window(cfg) is None else full
    return FamilyOptions(hidden_act=checked_activation(cfg, "exaone_moe"), nope_layers=nope,
                         tensor_parallel_refusal="its grouped sigmoid router beside per-head q/k norms "
                                                 "(K-EXAONE) is untested across ranks")


DIALECT = Dialect(architectures=("ExaoneMoeForCausalLM",), llama_keys=llama_keys, options=options)
