"""Youtu-LLM (``YoutuForCausalLM``): the dense Llama decoder (Qwen3's gated
MLP, no biases) with DeepSeek-V3's multi-head latent attention in every
layer, read from config.json as transformers' ``YoutuConfig`` does.

Attention: as ``splitserve.engine.dialects.deepseek_v2`` reads it (its keys
and defaults: ``q_lora_rank`` 1536 (null: a plain q_proj), ``kv_lora_rank``
512, ``qk_nope_head_dim`` 128, ``qk_rope_head_dim`` 64, ``v_head_dim`` 128;
the softmax scale with YaRN's ``mscale_all_dim``); the rope dims turned in
adjacent pairs unless ``rope_interleave`` is false or null (then
rotate-half); ``attention_bias`` on q_a_proj, kv_a_proj_with_mqa and
o_proj. transformers sizes the RoPE table by ``head_dim``, which its config
sets to ``qk_rope_head_dim`` unless config.json writes another: one that
differs is refused.

MLP: gate/up/down of ``intermediate_size`` (6144), ``hidden_act`` (SiLU;
gelu_pytorch_tanh too), no biases. Defaults: eps 1e-6,
``max_position_embeddings`` 131072, tied embeddings. The mixture-of-experts
keys of DeepSeek-V3's config, which ``YoutuConfig`` drops, are not read.

Refused: KV heads other than the head count, ``partial_rotary_factor``
(every rope dim rotates), fp8 checkpoints (untested here; ``weight_dtype:
fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary)
from splitserve.engine.dialects.deepseek_v2 import COPIED, attention_keys, latent_shape, softmax_scale
from splitserve.engine.family_config import FamilyOptions, family_activation

ARCH = "YoutuForCausalLM"
# transformers' YoutuConfig defaults, where config.json has no such key (the latent shape's
# are DeepSeek-V2's: deepseek_v2.latent_shape fills them in)
_DEFAULTS = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 32,
             "num_attention_heads": 16, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001}


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_DEFAULTS, **cfg}
    head_dim, rope = cfg.get("head_dim"), latent_shape(out).qk_rope_head_dim
    if head_dim is not None and int(head_dim) != rope:
        raise ValueError(f"head_dim ({head_dim}) differs from qk_rope_head_dim ({rope}): transformers' "
                         f"{ARCH} sizes its RoPE table by head_dim; write one of them")
    return out


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _with_defaults(cfg)
    return {**passed_keys(full, {k: None for k in COPIED}), **attention_keys(full, ARCH), "mlp_bias": False}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the latent projections")
    full = _with_defaults(cfg)
    refuse_partial_rotary(full, full.get("rope_parameters") or full.get("rope_scaling") or {}, ARCH)
    mla = latent_shape(full)
    return FamilyOptions(hidden_act=family_activation(full, "youtu"), rotary_dim=mla.qk_rope_head_dim,
                         attn_scale=softmax_scale(full, mla),
                         interleaved_rope=bool(full.get("rope_interleave", True)), mla=mla)


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
