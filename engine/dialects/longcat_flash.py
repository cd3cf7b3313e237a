"""LongCat-Flash (``LongcatFlashForCausalLM``): its config.json in Llama's
keys, and its ``FamilyOptions``, as transformers' LongcatFlashConfig and its
model read it.

Each of its ``num_layers`` (28) layers holds two pre-norm sublayers, each
DeepSeek's multi-head latent attention then a dense SwiGLU MLP of
``ffn_hidden_size`` (12288), plus a "shortcut" mixture of experts fed by the
first sublayer's post-attention norm whose output joins the residual after
the second. Here each sublayer is one decoder layer (``num_hidden_layers`` =
2 * ``num_layers``, each with its own KV cache) and the shortcut is carried
from the first to the second (``splitserve.engine.models.longcat_flash``).

- Attention as ``splitserve.engine.dialects.deepseek_v2`` reads it (same
  keys and defaults: ranks 1536 / 512, heads of 128 + 64 rotated dims,
  values of 128; the scores' scale with YaRN's ``mscale_all_dim``), the rope
  dims always turned in adjacent pairs; the q and the kv latents scaled by
  sqrt(hidden_size / ``q_lora_rank``) and sqrt(hidden_size /
  ``kv_lora_rank``).
  ``head_dim`` (64), the width of transformers' RoPE table, must be
  ``qk_rope_head_dim``.
- Experts: a float32 softmax router (``mlp.router.classifier``) over
  ``n_routed_experts`` (512) SwiGLU experts of ``expert_ffn_hidden_size``
  (2048) and ``zero_expert_num`` (256) zero-computation experts, which
  return their input; ``moe_topk`` (12) chosen by score plus the
  correction bias, weighted by their unbiased scores (not renormalised)
  times ``routed_scaling_factor`` (6.0).
- defaults: eps 1e-5, RoPE base 10000000, untied embeddings.

Multi-token-prediction tensors (``model.mtp.*``) are skipped at load, as
transformers skips them. Refused: a null ``q_lora_rank``, ``router_bias``, KV heads other than the
head count, ``qk_head_dim`` other than nope + rope, activations other than
SiLU, ``partial_rotary_factor``, fp8 checkpoints (untested: renamed
tensors), tensor parallelism (untested), LoRA adapters (as
DeepSeek's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.deepseek_v2 import COPIED, attention_keys, latent_shape, mla_options
from splitserve.engine.family_config import FamilyOptions

ARCH = "LongcatFlashForCausalLM"
DEFAULT_THETA = 10000000.0  # LongcatFlashConfig.default_theta
# LongcatFlashConfig's defaults where config.json has no such key (its names, then ours)
_DEFAULTS = {"num_layers": 28, "ffn_hidden_size": 12288, "n_routed_experts": 512, "zero_expert_num": 256,
             "moe_topk": 12, "expert_ffn_hidden_size": 2048, "routed_scaling_factor": 6.0,
             "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
             "num_attention_heads": 64, "head_dim": 64}


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json over the defaults, read under both names transformers accepts."""
    out = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    for ours, theirs in (("num_local_experts", "n_routed_experts"), ("num_experts_per_tok", "moe_topk"),
                         ("intermediate_size", "ffn_hidden_size"),
                         ("moe_intermediate_size", "expert_ffn_hidden_size")):
        if cfg.get(ours) is not None and cfg.get(theirs) is None:
            out[theirs] = cfg[ours]
    return out


def num_layers(cfg: dict[str, Any]) -> int:
    """LongCat-Flash layers (``num_layers``; ``num_hidden_layers``, its sublayers, halved)."""
    if cfg.get("num_layers") is not None:
        return int(cfg["num_layers"])
    if cfg.get("num_hidden_layers") is not None:
        return int(cfg["num_hidden_layers"]) // 2
    return _DEFAULTS["num_layers"]


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    c = _merged(cfg)
    if c.get("router_bias"):
        raise ValueError("router_bias is not supported for LongcatFlashForCausalLM (its router has no bias "
                         "here)")
    mla = latent_shape(c)
    if not mla.q_lora_rank or ("q_lora_rank" in cfg and not cfg["q_lora_rank"]):
        raise ValueError("q_lora_rank must be set for LongcatFlashForCausalLM (its queries always go "
                         "through q_a_proj / q_b_proj)")
    if int(c["head_dim"]) != mla.qk_rope_head_dim:
        raise ValueError(f"head_dim ({c['head_dim']}) must equal qk_rope_head_dim ({mla.qk_rope_head_dim}): "
                         "transformers sizes LongCat-Flash's RoPE table by head_dim")
    if c.get("qk_head_dim") is not None and int(c["qk_head_dim"]) != mla.qk_head_dim:
        raise ValueError(f"qk_head_dim ({c['qk_head_dim']}) must be qk_nope_head_dim + qk_rope_head_dim "
                         f"({mla.qk_head_dim})")
    experts, zero, top_k = int(c["n_routed_experts"]), int(c["zero_expert_num"] or 0), int(c["moe_topk"])
    if zero < 0 or not 0 < top_k <= experts:
        raise ValueError(f"moe_topk ({top_k}) must be in [1, n_routed_experts ({experts})] and "
                         f"zero_expert_num ({zero}) at least 0")
    scale = float(c["routed_scaling_factor"])
    if not scale > 0:
        raise ValueError(f"routed_scaling_factor must be positive, got {scale}")
    layers = 2 * num_layers(cfg)
    out = passed_keys({**c, "num_hidden_layers": layers, "intermediate_size": c["ffn_hidden_size"]},
                      {**{k: None for k in COPIED}, "num_hidden_layers": None, "intermediate_size": None})
    rope = c.get("rope_parameters") or c.get("rope_scaling")
    if not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        out["rope_theta"] = c.get("rope_theta", DEFAULT_THETA)
    return {**out, **attention_keys(c, ARCH), "mlp_bias": False,
            # the experts run in the shortcut beside the dense MLPs, not in place of one
            "num_experts": experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": int(c["expert_ffn_hidden_size"]), "norm_topk_prob": False,
            "mlp_only_layers": list(range(layers)), "moe_routing": {"routed_scaling_factor": scale}}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: its tensors renamed at load")
    c = _merged(cfg)
    opts = mla_options(c, "longcat_flash", ARCH, interleaved=True, mtp_layers=0)
    return dataclasses.replace(opts, zero_experts=int(c["zero_expert_num"] or 0),
                               tensor_parallel_refusal="its paired latent-attention sublayers and shortcut "
                                                       "experts (LongCat-Flash) are untested across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
