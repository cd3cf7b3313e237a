"""DBRX (``DbrxForCausalLM``): its config.json (``d_model``, ``n_heads``,
``n_layers``, ``max_seq_len``, and nested ``attn_config`` / ``ffn_config``)
in Llama's keys, as transformers' DbrxConfig reads it, and its
``FamilyOptions``.

- attention: ``n_heads`` heads of ``d_model / n_heads`` dims,
  ``attn_config.kv_n_heads`` (default 1) KV heads, q/k/v fused in ``Wqkv``
  and clamped to +-``attn_config.clip_qkv`` when set
  (``FamilyOptions.clip_qkv``), no biases anywhere;
- LayerNorm without a bias (eps 1e-5, torch's default), computed in float32
  (``FamilyOptions.float_layer_norm``: transformers' ``nn.LayerNorm(bias=False)``
  in float32 is the same arithmetic);
- every layer's MLP is ``ffn_config.moe_num_experts`` (default 4) SwiGLU experts of
  ``ffn_hidden_size`` (default 3584), ``moe_top_k`` (default 1) per token by a
  softmax router, the top-k weights divided by their p-norm,
  p = ``moe_normalize_expert_weights`` (default 1; null: not divided,
  ``MoEConfig.expert_weight_norm``); ``ffn_act_fn`` other than silu is refused;
- RoPE: transformers 5 writes the base in ``rope_parameters``; older configs
  hold it as ``attn_config.rope_theta``, which transformers 4 read and
  which is read here where config.json has no top-level one (transformers 5
  falls back to 10000 there); default 10000;
- tied embeddings are refused, as transformers refuses them.

Tensors are renamed and split at load (``splitserve.engine.models.dbrx``),
so fp8 checkpoints are refused (``weight_dtype: fp8`` quantizes at load).
Tensor parallelism splits them with the full model's sizes before each rank
takes its part (its experts' intermediate dimension, as Mixtral's).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint, refuse_partial_rotary, required
from splitserve.engine.family_config import FamilyOptions

DEFAULT_THETA = 10_000.0


def _sub(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    sub = cfg.get(key) or {}
    if not isinstance(sub, dict):
        raise ValueError(f"{key} must be an object, got {sub!r}")
    return sub


def _rope_theta(cfg: dict[str, Any], rope: dict[str, Any]) -> float:
    theta = rope.get("rope_theta") or cfg.get("rope_theta") or _sub(cfg, "attn_config").get("rope_theta")
    return float(theta or DEFAULT_THETA)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    refuse_fp8_checkpoint(cfg, "DBRX", "fused Wqkv and experts are split at load")
    attn, ffn = _sub(cfg, "attn_config"), _sub(cfg, "ffn_config")
    hidden, heads = int(required(cfg, "d_model", "hidden_size")), int(required(cfg, "n_heads"))
    if hidden % heads:
        raise ValueError(f"d_model ({hidden}) must be a multiple of n_heads ({heads})")
    if cfg.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings is not supported for DBRX (transformers refuses it too)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    refuse_partial_rotary(cfg, rope, "dbrx")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    ffn_size = int(ffn.get("ffn_hidden_size") or 3584)
    out = {
        "vocab_size": int(cfg.get("vocab_size") or 32000),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": int(attn.get("kv_n_heads") or 1),
        "head_dim": hidden // heads,
        "num_hidden_layers": int(required(cfg, "n_layers", "num_hidden_layers")),
        "max_position_embeddings": int(cfg.get("max_seq_len") or 2048),
        "intermediate_size": ffn_size,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": False, "attention_out_bias": False, "mlp_bias": False,
        "rope_theta": _rope_theta(cfg, rope),
        "num_experts": int(ffn.get("moe_num_experts") or 4),
        "num_experts_per_tok": int(ffn.get("moe_top_k") or 1),
        "moe_intermediate_size": ffn_size,
        "norm_topk_prob": False,
        "moe_routing": {"expert_weight_norm": None if p is None else float(p)},
    }
    if rope:
        out["rope_parameters"] = {**rope, "rope_theta": out["rope_theta"]}
    for key in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    act = _sub(cfg, "ffn_config").get("ffn_act_fn") or {"name": "silu"}
    if not isinstance(act, dict) or act.get("name", "silu") != "silu" or set(act) - {"name"}:
        raise ValueError(f"ffn_config.ffn_act_fn {act!r} is not supported for dbrx; supported: "
                         "{'name': 'silu'}")
    clip = _sub(cfg, "attn_config").get("clip_qkv")
    if clip is not None and float(clip) <= 0:
        raise ValueError(f"attn_config.clip_qkv must be positive, got {clip}")
    return FamilyOptions(hidden_act="silu", float_layer_norm="weight",
                         clip_qkv=None if clip is None else float(clip))


DIALECT = Dialect(architectures=("DbrxForCausalLM",), llama_keys=llama_keys, options=options)
