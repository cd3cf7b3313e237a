"""MiniMax-Text-01 (``MiniMaxForCausalLM``, transformers' ``minimax``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' MiniMaxConfig and its model read it:

- ``layer_types``: each layer ``linear_attention`` (lightning attention,
  ``splitserve.engine.models.lightning``, a [heads, head dim, head dim]
  state per sequence) or ``full_attention`` (Llama attention, RoPE over
  every dim of each head, no biases); default: even layers attend, odd
  layers are linear;
- every layer ``num_local_experts`` (8; ``num_experts`` its other name)
  SwiGLU experts of ``intermediate_size`` (14336) as Mixtral's
  (``block_sparse_moe.experts.N.w1/w3/w2``): softmax in float32, the top
  ``num_experts_per_tok`` (2) renormalised;
- each block's residual is its normed input, scaled: ``x = norm(x) *
  alpha + block(norm(x)) * beta`` with ``full_attn_alpha_factor`` /
  ``full_attn_beta_factor``, ``linear_attn_alpha_factor`` /
  ``linear_attn_beta_factor`` and ``mlp_alpha_factor`` / ``mlp_beta_factor``
  (all 1);
- ``head_dim`` (default hidden / heads), 8 KV heads, RoPE base 1e6
  (``MiniMaxConfig.default_theta``), eps 1e-5, untied embeddings.

Refused: ``sliding_window``; activations other than SiLU; the original
configs' keys that transformers does not read, where they ask for other
than it computes (``attn_type_list`` disagreeing with the layer types,
``postnorm`` false, ``layernorm_*_alpha`` / ``_beta`` other than the
factors above); fp8 checkpoints (untested: the lightning layers' fused
projections); tensor parallelism (the lightning layers are not sharded);
LoRA adapters. A hybrid model's engine caches prefixes with state checkpoints.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, HybridLayout, StateKind

ARCH = "MiniMaxForCausalLM"
LIGHTNING = "lightning_attention"
# keys read as Llama's, with transformers' MiniMaxConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 4096 * 32,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "bos_token_id": 1,
           "eos_token_id": 2}
DEFAULT_THETA = 1000000.0  # MiniMaxConfig.default_theta
# the residual factors: block -> (alpha, beta) keys
FACTORS = {"full": ("full_attn_alpha_factor", "full_attn_beta_factor"),
           "linear": ("linear_attn_alpha_factor", "linear_attn_beta_factor"),
           "mlp": ("mlp_alpha_factor", "mlp_beta_factor")}
# the original configs' names of the same factors, which transformers does not read
_ORIGINAL_FACTORS = {"layernorm_full_attention_alpha": "full_attn_alpha_factor",
                     "layernorm_full_attention_beta": "full_attn_beta_factor",
                     "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
                     "layernorm_linear_attention_beta": "linear_attn_beta_factor",
                     "layernorm_mlp_alpha": "mlp_alpha_factor", "layernorm_mlp_beta": "mlp_beta_factor"}


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}


def factor(cfg: dict[str, Any], key: str) -> float:
    value = cfg.get(key)
    return 1.0 if value is None else float(value)


def layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted({str(t) for t in types if t not in ("full_attention", "linear_attention")})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported for {ARCH}; "
                         "supported: full_attention, linear_attention")
    return list(types)


def _refuse_unread_keys(cfg: dict[str, Any], types: list[str]) -> None:
    """A ``ValueError`` for an original-config key asking for other than what
    transformers' MiniMax computes (it reads none of them)."""
    wrong = []
    if cfg.get("sliding_window") is not None:
        wrong.append(f"sliding_window {cfg['sliding_window']} (every attention layer sees all)")
    listed = cfg.get("attn_type_list")
    if listed is not None and [("full_attention" if int(t) else "linear_attention") for t in listed] != types:
        wrong.append(f"attn_type_list {list(listed)} disagreeing with layer_types {types}")
    if cfg.get("postnorm") is False:
        wrong.append("postnorm false (each residual is the block's normed input)")
    for old, new in _ORIGINAL_FACTORS.items():
        if cfg.get(old) is not None and float(cfg[old]) != factor(cfg, new):
            wrong.append(f"{old} {cfg[old]} (transformers reads {new}: {factor(cfg, new)})")
    if wrong:
        raise ValueError(f"{ARCH} options not supported: " + "; ".join(wrong))


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 8)
    if experts < 2:
        raise ValueError(f"num_local_experts must be at least 2, got {experts}")
    expert_size = int(cfg.get("intermediate_size") or 14336)
    return {**out, "intermediate_size": expert_size, "qk_norm": False, "attention_bias": False,
            "attention_out_bias": False, "mlp_bias": False, "num_experts": experts,
            "num_experts_per_tok": int(cfg.get("num_experts_per_tok") or 2),
            "moe_intermediate_size": expert_size, "norm_topk_prob": True}


def lightning_states(cfg: dict[str, Any]) -> tuple[StateKind, ...]:
    """The lightning layers' state: per head, the decayed sum of k^T v
    [head dim, head dim], in float32."""
    full = _merged(cfg)
    heads = int(full["num_attention_heads"])
    head_dim = int(full.get("head_dim") or int(full["hidden_size"]) // heads)
    return (StateKind("recurrent", (heads, head_dim, head_dim), "float32"),)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: its lightning layers' fused projections")
    full = _merged(cfg)
    types = layer_types(cfg, int(full["num_hidden_layers"]))
    _refuse_unread_keys(cfg, types)
    kinds = tuple(ATTENTION if t == "full_attention" else LIGHTNING for t in types)
    return FamilyOptions(hidden_act=checked_activation(cfg, "minimax"),
                         hybrid=HybridLayout(kinds, lightning_states(cfg)),
                         residual_factors=tuple((factor(cfg, a), factor(cfg, b)) for a, b in FACTORS.values()),
                         tensor_parallel_refusal="minimax's recurrent (lightning attention) layers are not "
                                                 "sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
