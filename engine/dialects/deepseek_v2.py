"""DeepSeek-V2 (``DeepseekV2ForCausalLM``): multi-head latent attention and
a softmax-routed mixture of experts, read from config.json as transformers'
``DeepseekV2Config`` does.

Attention (``FamilyOptions.mla``, ``splitserve.engine.models.mla``):
``q_lora_rank`` (1536; null: a plain q_proj), ``kv_lora_rank`` (512),
``qk_nope_head_dim`` (128), ``qk_rope_head_dim`` (64), ``v_head_dim`` (128);
one KV head for all query heads, the latent and rotated k_pe
(``kv_lora_rank + qk_rope_head_dim`` wide) that the absorbed form attends
to. RoPE turns the rope dims in adjacent pairs
(``FamilyOptions.interleaved_rope``; V2's complex form), its table as wide
as ``qk_rope_head_dim``; scores are scaled by ``1 / sqrt(nope + rope)``,
times ``yarn_mscale(factor, mscale_all_dim) ** 2`` when the scaled RoPE's
dict sets ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``).
``attention_bias`` covers q_a_proj, kv_a_proj_with_mqa and o_proj.

Experts (``MoEConfig.scaled_softmax``): ``n_routed_experts`` (64) of
``moe_intermediate_size`` (1407), ``num_experts_per_tok`` per token by
softmax score (``topk_method`` greedy, or group_limited_greedy over
``n_group`` groups keeping ``topk_group``), the weights never renormalised,
times ``routed_scaling_factor`` (1.0); ``n_shared_experts`` (2) * the
expert width as one ungated shared MLP; the first ``first_k_dense_replace``
(0) layers dense; ``mlp_bias`` on the dense and shared MLPs.

fp8 checkpoints (``quantization_config``; DeepSeek's own releases are
128x128 block-fp8) load every latent projection, dense MLP and expert in
fp8 with its scales; routers, norms and the correction bias stay float.

Refused: ``num_key_value_heads`` other than the head count,
``moe_layer_freq`` other than 1 and ``norm_topk_prob`` (transformers'
DeepSeek-V2 reads neither), other ``topk_method``s (noaux_tc is V3's
router), activations other than SiLU, ``partial_rotary_factor``.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_partial_rotary, required
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.mla_config import MLAConfig

ARCH = "DeepseekV2ForCausalLM"
# keys read as Llama's, as written (no default: ModelConfig's, which are DeepSeek's too)
COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "rope_theta",
          "rope_parameters", "rope_scaling", "original_max_position_embeddings", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
          "quantization_config")
# transformers' DeepseekV2Config defaults of the latent shape, where config.json has no such key
_MLA_DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                 "v_head_dim": 128}
_TOPK_METHODS = ("greedy", "group_limited_greedy")


def latent_shape(cfg: dict[str, Any]) -> MLAConfig:
    """The attention's ranks and head widths (``_MLA_DEFAULTS`` where absent)."""
    dims = {k: cfg.get(k, default) for k, default in _MLA_DEFAULTS.items()}
    dims["q_lora_rank"] = dims["q_lora_rank"] or 0  # null: q_proj straight from the hidden state
    for key, value in dims.items():
        if value is None or int(value) < (0 if key == "q_lora_rank" else 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if int(dims["qk_rope_head_dim"]) % 2:
        raise ValueError(f"qk_rope_head_dim must be even (RoPE turns dim pairs), got "
                         f"{dims['qk_rope_head_dim']}")
    return MLAConfig(**{k: int(v) for k, v in dims.items()})


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's ``0.1 * mscale * ln(factor) + 1`` (1 when not stretched), as transformers'
    ``yarn_get_mscale``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: dict[str, Any], mla: MLAConfig) -> float:
    """``1 / sqrt(nope + rope)``, times ``yarn_mscale(factor, mscale_all_dim) ** 2`` when
    a scaled RoPE sets ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``)."""
    scale = mla.qk_head_dim ** (-0.5)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    all_dim = rope.get("mscale_all_dim") or 0
    if kind != "default" and all_dim:
        if rope.get("factor") is None:
            raise ValueError("rope_parameters sets mscale_all_dim without factor")
        mscale = yarn_mscale(float(rope["factor"]), float(all_dim))
        scale = scale * mscale * mscale
    return scale


def attention_keys(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The attention in Llama-style keys: one KV head, the cached latent
    (``MLAConfig.cache_head_dim`` wide), for every query head; ``attention_bias``
    on q_a_proj, kv_a_proj_with_mqa and o_proj."""
    heads = int(required(cfg, "num_attention_heads"))
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is not None and int(kv_heads) != heads:
        raise ValueError(f"num_key_value_heads ({kv_heads}) must equal num_attention_heads ({heads}) for "
                         f"{arch}: transformers' latent attention gives every head its own key and value")
    bias = bool(cfg.get("attention_bias", False))
    return {"num_attention_heads": heads, "num_key_value_heads": 1,
            "head_dim": latent_shape(cfg).cache_head_dim, "attention_bias": bias, "attention_out_bias": bias,
            "qk_norm": False}


def refuse_unread_keys(cfg: dict[str, Any], arch: str) -> None:
    """A ``ValueError`` for what DeepSeek's original code reads but transformers' does not."""
    freq = cfg.get("moe_layer_freq", 1)
    if freq is not None and int(freq) != 1:
        raise ValueError(f"moe_layer_freq {freq} is not supported for {arch} (transformers puts experts "
                         "in every layer from first_k_dense_replace on)")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, arch)


def mla_options(cfg: dict[str, Any], family: str, arch: str, interleaved: bool,
                mtp_layers: int) -> FamilyOptions:
    """The options both DeepSeek dialects give: SiLU experts, the latent attention and
    its softmax scale, RoPE over the rope dims only."""
    refuse_unread_keys(cfg, arch)
    mla = latent_shape(cfg)
    return FamilyOptions(hidden_act=checked_activation(cfg, family), rotary_dim=mla.qk_rope_head_dim,
                         attn_scale=softmax_scale(cfg, mla), interleaved_rope=interleaved,
                         mtp_layers=mtp_layers, mla=mla)


def _moe_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    experts = int(cfg.get("n_routed_experts") or 64)
    top_k = int(required(cfg, "num_experts_per_tok"))
    method = cfg.get("topk_method") or "greedy"
    if method not in _TOPK_METHODS:
        raise ValueError(f"topk_method {method!r} is not supported for {ARCH}; supported: "
                         f"{', '.join(_TOPK_METHODS)} (noaux_tc routing is DeepseekV3ForCausalLM's)")
    if cfg.get("norm_topk_prob"):
        raise ValueError(f"norm_topk_prob is not supported for {ARCH} (transformers' DeepSeek-V2 router "
                         "never renormalises its top-k weights)")
    groups, kept = 1, 1
    if method == "group_limited_greedy":
        groups, kept = int(required(cfg, "n_group")), int(required(cfg, "topk_group"))
        if groups <= 0 or experts % groups:
            raise ValueError(f"n_group ({groups}) must split n_routed_experts ({experts}) into equal groups")
        if not 0 < kept <= groups or not 0 < top_k <= kept * (experts // groups):
            raise ValueError(f"topk_group ({kept}) must be in [1, n_group ({groups})] and "
                             f"num_experts_per_tok ({top_k}) at most the experts of the kept groups "
                             f"({kept} * {experts // groups})")
    elif not 0 < top_k <= experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, n_routed_experts ({experts})]")
    scale = float(cfg.get("routed_scaling_factor", 1.0))
    if not scale > 0:
        raise ValueError(f"routed_scaling_factor must be positive, got {scale}")
    expert_size = int(cfg.get("moe_intermediate_size") or 1407)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": expert_size,
        "norm_topk_prob": False,
        "mlp_only_layers": list(range(int(cfg.get("first_k_dense_replace") or 0))),
        "shared_expert_intermediate_size": expert_size * int(cfg.get("n_shared_experts", 2) or 0),
        "moe_routing": {"scaled_softmax": True, "group_limited": method == "group_limited_greedy",
                        "num_groups": groups, "topk_groups": kept, "routed_scaling_factor": scale},
    }


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**passed_keys(cfg, {k: None for k in COPIED}), **attention_keys(cfg, ARCH), **_moe_keys(cfg),
            "mlp_bias": bool(cfg.get("mlp_bias", False))}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return mla_options(cfg, "deepseek_v2", ARCH, interleaved=True, mtp_layers=0)


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
