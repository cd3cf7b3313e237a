"""OLMoE (``OlmoeForCausalLM``): the Llama-style decoder with a sparse MLP
in every layer, read from its config.json as transformers' ``OlmoeConfig``
does.

- ``intermediate_size`` is each expert's; ``num_experts`` (default 64)
  experts, ``num_experts_per_tok`` (default 8) of them per token, routed
  as Qwen-MoE routes (softmax over all experts in float32, then the top k,
  renormalised only with ``norm_topk_prob``, default off);
- q_norm / k_norm: RMSNorm over a token's whole q and k (all heads at
  once, ``FamilyOptions.full_qk_norm``); transformers sizes q_norm by
  hidden_size, so the heads must span it exactly;
- ``clip_qkv``: q, k and v clamped after those norms (``FamilyOptions.clip_qkv``);
- ``attention_bias`` covers q/k/v and o_proj; ``rms_norm_eps`` defaults to 1e-5.

Its checkpoints name experts as Qwen-MoE's do (``mlp.experts.3.gate_proj``,
the router ``mlp.gate``), so ``splitserve.engine.models.moe`` loads them as they are.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect
from splitserve.engine.dialects.moe_keys import checked_activation, without_window_keys
from splitserve.engine.family_config import FamilyOptions


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise ValueError(f"OLMoE's q_norm spans hidden_size: head_dim * num_attention_heads "
                         f"({head_dim} * {heads}) must equal hidden_size ({hidden})")
    return {
        **without_window_keys(cfg),
        "rms_norm_eps": cfg.get("rms_norm_eps") or 1e-5,
        "qk_norm": True,
        "attention_out_bias": bool(cfg.get("attention_bias", False)),  # o_proj's, as q/k/v's
        "mlp_bias": False,
        "num_experts": int(cfg.get("num_experts") or 64),
        "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 8),
        "moe_intermediate_size": int(cfg["intermediate_size"]),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    clip = cfg.get("clip_qkv")
    if clip is not None and float(clip) <= 0:
        raise ValueError(f"clip_qkv must be positive, got {clip}")
    return FamilyOptions(hidden_act=checked_activation(cfg, "olmoe"), full_qk_norm=True,
                         clip_qkv=None if clip is None else float(clip))


DIALECT = Dialect(architectures=("OlmoeForCausalLM",), llama_keys=llama_keys, options=options)
