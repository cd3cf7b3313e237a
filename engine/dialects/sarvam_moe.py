"""Sarvam MoE (``SarvamMoEForCausalLM``, sarvam-30b) and Param2 MoE
(``Param2MoEForCausalLM``): GLM-4.5's decoder read from config.json as
transformers' ``SarvamMoEConfig`` / ``Param2MoeConfig`` do (transformers
runs both as ``Glm4MoeForCausalLM``, and saves them under that
architecture: their ``model_type`` picks these families whatever
config.json's ``architectures`` says).

What differs from ``splitserve.engine.dialects.glm4_moe``:

- the original configs' names are read too: ``num_experts``
  (``n_routed_experts``), ``num_shared_experts`` (``n_shared_experts``),
  ``use_qkv_bias`` (``attention_bias``), ``num_mtp_layers``
  (``num_nextn_predict_layers``);
- every dim of each head rotates unless ``partial_rotary_factor`` says
  otherwise; q/k norms on unless ``use_qk_norm`` is false; no
  multi-token-prediction layers unless written;
- the defaults of each config class (``_SARVAM`` / ``_PARAM2`` below:
  RoPE base, KV heads, head_dim, experts, ``routed_scaling_factor`` 2.5,
  eps 1e-6, Param2's tied embeddings).

Their checkpoints keep the original tensor names (``word_embeddings``,
fused ``attention.query_key_value``, ``attention.dense``,
``query_layernorm`` / ``key_layernorm``, ``mlp.gate.expert_bias``), mapped at
load by ``splitserve.engine.models.sarvam_moe``. Refused as GLM-4.5 refuses
(router shapes, activations other than SiLU), and fp8 checkpoints (their
fused q/k/v is split at load; ``weight_dtype: fp8`` quantizes at load
instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects import glm4_moe
from splitserve.engine.family_config import FamilyOptions

# the original configs' key -> the name GLM-4.5's config reads
_OLD_NAMES = (("num_experts", "n_routed_experts"), ("num_shared_experts", "n_shared_experts"),
              ("use_qkv_bias", "attention_bias"), ("num_mtp_layers", "num_nextn_predict_layers"))
# transformers' config defaults, where config.json has no such key
_COMMON = {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "attention_bias": False, "num_experts_per_tok": 6, "routed_scaling_factor": 2.5,
           "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
           "use_qk_norm": True, "num_nextn_predict_layers": 0, "head_dim": 64}
_SARVAM = {**_COMMON, "num_key_value_heads": 4, "n_routed_experts": 128, "n_shared_experts": 1,
           "moe_intermediate_size": 1024, "rope_theta": 8_000_000.0, "eos_token_id": 1}
_PARAM2 = {**_COMMON, "num_key_value_heads": 8, "n_routed_experts": 64, "n_shared_experts": 2,
           "moe_intermediate_size": 2048, "rope_theta": 500_000.0, "max_position_embeddings": 32768,
           "tie_word_embeddings": True, "eos_token_id": 3}


def glm_config(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as GLM-4.5's config.json: old names renamed, the family's
    defaults filled in, full rotation unless written otherwise."""
    out = dict(cfg)
    for old, new in _OLD_NAMES:
        if old in cfg and new not in cfg:
            out[new] = cfg[old]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    rope = rope if isinstance(rope, dict) else {}
    for key, default in defaults.items():
        if out.get(key) is None and not (key == "rope_theta" and rope.get("rope_theta") is not None):
            out[key] = default
    if rope.get("partial_rotary_factor") is None and out.get("partial_rotary_factor") is None:
        out["partial_rotary_factor"] = 1.0
    return out


def _dialect(arch: str, model_type: str, defaults: dict[str, Any]) -> Dialect:
    def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
        return glm4_moe.llama_keys(glm_config(cfg, defaults))

    def options(cfg: dict[str, Any]) -> FamilyOptions:
        refuse_fp8_checkpoint(cfg, arch, "untested: the fused query_key_value is split at load")
        return glm4_moe.options(glm_config(cfg, defaults))

    return Dialect(architectures=(arch,), llama_keys=llama_keys, options=options, model_types=(model_type,))


DIALECT = _dialect("SarvamMoEForCausalLM", "sarvam_moe", _SARVAM)
PARAM2_DIALECT = _dialect("Param2MoEForCausalLM", "param2moe", _PARAM2)
