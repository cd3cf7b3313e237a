"""FlexOlmo (``FlexOlmoForCausalLM``): OLMo 2's decoder with OLMoE's
mixture of experts in every layer, read from config.json as transformers'
``FlexOlmoConfig`` does.

- OLMo 2's layers (``splitserve.engine.models.olmo2``): norms on the
  attention and MLP outputs, none before them, the float32 weight product;
  q_norm / k_norm over a token's whole q and k (``FamilyOptions.full_qk_norm``),
  sized by the heads, so ``head_dim`` may differ from hidden_size / heads;
- ``intermediate_size`` is each expert's; ``num_experts`` (default 7;
  ``num_local_experts`` its other name) experts, ``num_experts_per_tok``
  (default 5) per token, routed as OLMoE (softmax over all experts in
  float32, then the top k, renormalised only with ``norm_topk_prob``,
  default off);
- ``attention_bias`` covers q/k/v and o_proj, the experts have none;
  eps 1e-6, RoPE base 500000, untied embeddings by default.

Its checkpoints name experts as OLMoE's (``mlp.experts.3.gate_proj``, the
router ``mlp.gate``), so they load as they are. Refused: activations other
than SiLU and a ``partial_rotary_factor`` other than 1.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_partial_rotary
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' FlexOlmoConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": None, "head_dim": None,
           "attention_bias": False, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": None, "eos_token_id": 100257, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "max_position_embeddings": 4096,
           "rope_parameters": None, "rope_scaling": None}
DEFAULT_THETA = 500000.0  # FlexOlmoConfig.default_theta


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    refuse_partial_rotary(cfg, rope if isinstance(rope, dict) else {}, "flex_olmo")
    out = passed_keys(cfg, _PASSED)
    if not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    return {
        **out,
        "intermediate_size": int(cfg["intermediate_size"]),
        "qk_norm": True,
        "mlp_bias": False,
        "num_experts": int(cfg.get("num_experts") or cfg.get("num_local_experts") or 7),
        "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 5),
        "moe_intermediate_size": int(cfg["intermediate_size"]),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=checked_activation(cfg, "flex_olmo"), post_norms=True,
                         full_qk_norm=True, norm_fp32_product=True)


DIALECT = Dialect(architectures=("FlexOlmoForCausalLM",), llama_keys=llama_keys, options=options)
