"""MiniMax-M2 (``MiniMaxM2ForCausalLM``): the Llama-style decoder with a
sigmoid-routed mixture of experts in every layer, read from config.json as
transformers' ``MiniMaxM2Config`` does.

- ``intermediate_size`` (default 1536) is each expert's;
  ``num_local_experts`` (256; ``num_experts`` its other name) experts,
  ``num_experts_per_tok`` (8) per token, routed in float32: sigmoid scores,
  the checkpoint's ``block_sparse_moe.e_score_correction_bias`` added for
  choosing only, the chosen experts' unbiased scores renormalised to sum to
  one. That is GLM-4.5's grouped router with a single group and no scaling
  (``splitserve.engine.models.grouped_router``);
- q_norm / k_norm: RMSNorm over a token's whole q and k (all heads at
  once, ``FamilyOptions.full_qk_norm``), before RoPE;
- RoPE on each head's first ``rotary_dim`` dims (``partial_rotary_factor``
  in ``rope_parameters`` or at top level its other form; default: all),
  rotate-half pairs as Llama;
- no biases; defaults: 8 KV heads, head_dim 128, eps 1e-6, RoPE base
  5000000, untied embeddings.

Refused: activations other than SiLU; fewer than 2 experts; the original
configs' keys that transformers ignores, where they ask for something else
than it computes (``scoring_func`` other than sigmoid, ``use_routing_bias``,
``use_qk_norm`` off, ``qk_norm_type`` other than per_layer, a
``shared_intermediate_size``, ``attn_type_list`` with linear-attention
layers); fp8 checkpoints (untested here, their router bias renamed at load;
``weight_dtype: fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.moe_keys import checked_activation, without_window_keys
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' MiniMaxM2Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": 8, "head_dim": 128,
           "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": 200034, "eos_token_id": 200020, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "max_position_embeddings": 196608,
           "rope_parameters": None, "rope_scaling": None}
DEFAULT_THETA = 5000000.0  # MiniMaxM2Config.default_theta


def _refuse_ignored_keys(cfg: dict[str, Any]) -> None:
    """A ``ValueError`` for an original-config key asking for other than what
    transformers' MiniMaxM2 computes (it reads none of them)."""
    wrong = []
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        wrong.append(f"scoring_func {cfg['scoring_func']!r} (only sigmoid)")
    if cfg.get("use_routing_bias") is False:
        wrong.append("use_routing_bias false (the router's correction bias is always used)")
    if cfg.get("use_qk_norm") is False:
        wrong.append("use_qk_norm false (q/k are always normed)")
    if cfg.get("qk_norm_type", "per_layer") != "per_layer":
        wrong.append(f"qk_norm_type {cfg['qk_norm_type']!r} (only per_layer: over all heads)")
    if cfg.get("shared_intermediate_size"):
        wrong.append(f"shared_intermediate_size {cfg['shared_intermediate_size']} (no shared expert)")
    if any(int(t) != 1 for t in cfg.get("attn_type_list") or ()):
        wrong.append("attn_type_list with linear-attention layers (0 entries; only softmax attention)")
    if wrong:
        raise ValueError("MiniMax-M2 options not supported: " + "; ".join(wrong))


def rotary_dim(cfg: dict[str, Any]) -> int | None:
    """How many of each head's dims rotate: ``partial_rotary_factor`` (in
    ``rope_parameters`` or at top level), else ``rotary_dim``; None: all."""
    head_dim = int(cfg.get("head_dim") or _PASSED["head_dim"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    rope = rope if isinstance(rope, dict) else {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if factor is None and cfg.get("rotary_dim") is not None:
        factor = int(cfg["rotary_dim"]) / head_dim
    dim = int(head_dim * (1.0 if factor is None else float(factor)))
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"rotary_dim / partial_rotary_factor gives {dim} rotated dims of {head_dim}; "
                         "an even number in (0, head_dim] is needed")
    return None if dim == head_dim else dim


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    _refuse_ignored_keys(cfg)
    out = passed_keys(without_window_keys(cfg), _PASSED)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    rotary_dim(cfg)  # refused here, before the rope table reads it as options.rotary_dim
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 256)
    if experts < 2:
        raise ValueError(f"num_local_experts must be at least 2, got {experts}")
    expert_size = int(cfg.get("intermediate_size") or 1536)
    return {
        **out,
        "intermediate_size": expert_size,
        "qk_norm": True,
        "attention_bias": False,
        "attention_out_bias": False,
        "mlp_bias": False,
        "num_experts": experts,
        "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 8),
        "moe_intermediate_size": expert_size,
        "norm_topk_prob": True,
        "moe_routing": {"grouped_sigmoid": True, "num_groups": 1, "topk_groups": 1,
                        "routed_scaling_factor": 1.0},
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "MiniMaxM2ForCausalLM", "untested: the float32 router and its "
                          "correction bias, renamed at load, beside fp8 experts")
    return FamilyOptions(hidden_act=checked_activation(cfg, "minimax_m2"), full_qk_norm=True,
                         rotary_dim=rotary_dim(cfg))


DIALECT = Dialect(architectures=("MiniMaxM2ForCausalLM",), llama_keys=llama_keys, options=options)
