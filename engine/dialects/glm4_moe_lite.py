"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``): DeepSeek-V3's multi-head
latent attention with GLM-4.5's mixture of experts, read from config.json as
transformers' ``Glm4MoeLiteConfig`` does.

Attention: as ``splitserve.engine.dialects.deepseek_v2`` reads it (its keys,
the softmax scale with YaRN's ``mscale_all_dim``), with this family's
defaults: ``q_lora_rank`` 768 (null: a plain q_proj), ``kv_lora_rank`` 512,
``qk_nope_head_dim`` 192, ``qk_rope_head_dim`` 64, ``v_head_dim`` 256; the
rope dims turned in adjacent pairs unless ``rope_interleave`` is false (then
rotate-half); ``attention_bias`` on q_a_proj, kv_a_proj_with_mqa and o_proj.
transformers reads a ``head_dim`` key as ``qk_rope_head_dim`` (its
attribute_map): one that disagrees with ``qk_rope_head_dim`` is refused.

Experts: GLM-4.5's grouped sigmoid router (``splitserve.engine.dialects.glm4_moe``):
``n_routed_experts`` (64; ``num_local_experts`` its other name) of
``moe_intermediate_size`` (1536), ``num_experts_per_tok`` (4), ``n_group`` (1),
``topk_group`` (1), ``norm_topk_prob`` (on), ``routed_scaling_factor`` (1.8),
the checkpoint's ``mlp.gate.e_score_correction_bias``; ``n_shared_experts``
(1) as one ungated shared MLP. Which layers are dense is ``mlp_layer_types``
("dense" / "sparse" per layer; default: layer 0 dense, the rest sparse);
transformers does not read ``first_k_dense_replace``, so one that disagrees
with those layer types is refused. ``topk_method`` and ``scoring_func`` are
not read (the router is always this one). No MLP biases; defaults eps 1e-5,
``max_position_embeddings`` 202752, untied embeddings.

``num_nextn_predict_layers`` (default 1) multi-token-prediction layers,
stored as the layers after the last, are skipped at load, as transformers
skips them. Refused besides: KV heads other than the head count,
``moe_layer_freq``, activations other than SiLU, ``partial_rotary_factor``
(transformers' table would not match the rope dims), the router shapes
GLM-4.5's refuses, and fp8 checkpoints (untested here; ``weight_dtype: fp8``
quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.deepseek_v2 import COPIED, attention_keys, mla_options
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.family_config import FamilyOptions

ARCH = "Glm4MoeLiteForCausalLM"
# transformers' Glm4MoeLiteConfig defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240, "num_hidden_layers": 47,
             "num_attention_heads": 20, "max_position_embeddings": 202752, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
             "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
             "v_head_dim": 256}
_ROUTER_DEFAULTS = {"n_routed_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 1536,
                    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.8}
_LAYER_TYPES = ("dense", "sparse")


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with ``_DEFAULTS`` and the router's filled in where absent (an explicit
    null ``q_lora_rank`` stays: a plain q_proj)."""
    out = {**_DEFAULTS, **_ROUTER_DEFAULTS, **cfg}
    if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:
        out["n_routed_experts"] = cfg["num_local_experts"]  # attribute_map's other name
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != int(out["qk_rope_head_dim"]):
        raise ValueError(f"head_dim ({head_dim}) differs from qk_rope_head_dim ({out['qk_rope_head_dim']}): "
                         f"transformers' {ARCH} reads head_dim as qk_rope_head_dim; write one of them")
    return out


def mlp_layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's MLP, "dense" or "sparse" (transformers' default: layer 0 dense)."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    if len(types) != n or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"mlp_layer_types must give each of the {n} layers one of "
                         f"{', '.join(_LAYER_TYPES)}, got {types!r}")
    first = cfg.get("first_k_dense_replace")
    if first is not None and types != ["dense"] * min(int(first), n) + ["sparse"] * (n - int(first)):
        raise ValueError(f"first_k_dense_replace ({first}) disagrees with mlp_layer_types {types!r} "
                         f"(transformers' {ARCH} reads only mlp_layer_types, by default layer 0 "
                         "dense); drop it or write mlp_layer_types to match")
    return types


def latent_moe_keys(full: dict[str, Any], family: str, arch: str,
                    layer_types: list[str]) -> dict[str, Any]:
    """The Llama keys of a latent-attention family with GLM-4.5's router whose
    layers are "dense" or "sparse" by ``layer_types`` (``full``: config.json
    with the family's defaults), no MLP biases."""
    moe = moe_keys({**full, "first_k_dense_replace": 0}, family, first_dense=0, norm_topk=True)
    moe["mlp_only_layers"] = [i for i, t in enumerate(layer_types) if t == "dense"]
    return {**passed_keys(full, {k: None for k in COPIED}), **attention_keys(full, arch), **moe,
            "mlp_bias": False}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _with_defaults(cfg)
    return latent_moe_keys(full, "glm4_moe_lite", ARCH, mlp_layer_types(full))


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the latent projections and experts beside the "
                          "float32 router")
    full = _with_defaults(cfg)
    mlp_layer_types(full)
    mtp = int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 1)) or 0)
    if mtp < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {mtp}")
    return mla_options(full, "glm4_moe_lite", ARCH, interleaved=bool(full.get("rope_interleave", True)),
                       mtp_layers=mtp)


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
