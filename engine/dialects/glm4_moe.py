"""GLM-4.5 / 4.6 (``Glm4MoeForCausalLM``): the Llama-style decoder with
GLM-4.5's mixture of experts, read from config.json as transformers'
``Glm4MoeConfig`` does.

- ``n_routed_experts`` (default 128; ``num_local_experts`` its other name)
  experts of ``moe_intermediate_size`` (1408), ``num_experts_per_tok`` (8)
  per token, chosen by the grouped sigmoid router
  (``splitserve.engine.models.grouped_router``: ``n_group``, ``topk_group``,
  ``norm_topk_prob`` (on), ``routed_scaling_factor``, the checkpoint's
  ``mlp.gate.e_score_correction_bias``);
- ``n_shared_experts`` (1) shared experts: one ungated SwiGLU MLP of
  ``moe_intermediate_size * n_shared_experts`` every token runs, added to
  the routed experts' output;
- the first ``first_k_dense_replace`` (1) layers have a dense MLP of
  ``intermediate_size`` instead;
- RoPE on each head's first ``partial_rotary_factor`` (0.5, in
  ``rope_parameters`` or at top level) of dims, rotate-half pairs as Llama;
- ``use_qk_norm``: per-head RMSNorm on q and k before RoPE;
  ``attention_bias`` covers q/k/v only (o_proj and the MLPs have none);
- defaults: 8 KV heads, eps 1e-5, untied embeddings; ``head_dim`` as
  written, else hidden_size / num_attention_heads.

``num_nextn_predict_layers`` multi-token-prediction layers, stored as the
layers after the last, are skipped at load, as transformers skips them.
Refused: router groups that do not split the experts evenly into groups of
two or more, a ``topk_group`` / ``num_experts_per_tok`` the kept groups
cannot hold, activations other than SiLU, fp8 checkpoints (untested here;
``weight_dtype: fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.dialects.glm import rotary_dim as glm_rotary_dim
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, as written (no default: config.json must hold them)
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "head_dim", "rope_theta", "rope_parameters", "rope_scaling", "torch_dtype", "dtype",
           "bos_token_id", "eos_token_id")
# transformers' Glm4MoeConfig defaults, where config.json has no such key
_DEFAULTS = {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
             "tie_word_embeddings": False, "attention_bias": False}


def moe_keys(cfg: dict[str, Any], family: str, first_dense: int, norm_topk: bool) -> dict[str, Any]:
    """The experts, shared experts, dense first layers and grouped router in
    Llama-style keys, as GLM-4.5 and dots.llm1 read them (their defaults for
    ``first_k_dense_replace`` and ``norm_topk_prob`` given)."""
    experts = int(required(cfg, "n_routed_experts", "num_local_experts"))
    top_k = int(required(cfg, "num_experts_per_tok"))
    groups, kept = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if groups <= 0 or experts % groups or experts // groups < 2:
        raise ValueError(f"n_group ({groups}) must split n_routed_experts ({experts}) into equal "
                         f"groups of at least 2 experts ({family}'s router rates each group by its "
                         "two best)")
    if not 0 < kept <= groups or not 0 < top_k <= kept * (experts // groups):
        raise ValueError(f"topk_group ({kept}) must be in [1, n_group ({groups})] and "
                         f"num_experts_per_tok ({top_k}) at most the experts of the kept groups "
                         f"({kept} * {experts // groups})")
    scale = float(cfg.get("routed_scaling_factor", 1.0))
    if not scale > 0:
        raise ValueError(f"routed_scaling_factor must be positive, got {scale}")
    expert_size = int(required(cfg, "moe_intermediate_size"))
    first = int(cfg.get("first_k_dense_replace", first_dense) or 0)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": expert_size,
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", norm_topk)),
        "mlp_only_layers": list(range(first)),
        "shared_expert_intermediate_size": expert_size * int(cfg.get("n_shared_experts") or 0),
        "moe_routing": {"grouped_sigmoid": True, "num_groups": groups, "topk_groups": kept,
                        "routed_scaling_factor": scale},
    }


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    routed = {"n_routed_experts": cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 128,
              "num_experts_per_tok": cfg.get("num_experts_per_tok") or 8,
              "moe_intermediate_size": cfg.get("moe_intermediate_size") or 1408,
              "n_shared_experts": cfg.get("n_shared_experts", 1)}
    return {**passed_keys(cfg, {**{k: None for k in _COPIED}, **_DEFAULTS}),
            **moe_keys({**cfg, **routed}, "glm4_moe", first_dense=1, norm_topk=True),
            "qk_norm": bool(cfg.get("use_qk_norm", False)), "attention_out_bias": False, "mlp_bias": False}


def rotary_dim(cfg: dict[str, Any]) -> int | None:
    """How many of each head's dims rotate (``partial_rotary_factor``, default
    0.5, as GLM's); None: all of them."""
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return glm_rotary_dim({**cfg, "head_dim": head_dim})


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Glm4MoeForCausalLM", "untested: the float32 router and its "
                          "correction bias beside fp8 experts")
    mtp = int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 1)) or 0)
    if mtp < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {mtp}")
    return FamilyOptions(hidden_act=checked_activation(cfg, "glm4_moe"), rotary_dim=rotary_dim(cfg),
                         mtp_layers=mtp)


DIALECT = Dialect(architectures=("Glm4MoeForCausalLM",), llama_keys=llama_keys, options=options)
