"""Flint (``FlintForCausalLM``): Qwen3-MoE's decoder with gpt-oss's
attention sinks, read from config.json as transformers' ``FlintConfig``
does.

- ``layer_types``: the sliding layers attend to the last ``sliding_window``
  (513) tokens with RoPE; the full-attention layers apply no RoPE
  (``FamilyOptions.nope_layers``). Default: full attention on layers 0 and
  1, every fourth layer from 1 on and the last, sliding elsewhere;
- per-head q/k RMSNorms before RoPE (as Qwen3), ``attention_bias`` on
  q/k/v/o; each head's learned ``self_attn.sinks`` logit joins its softmax's
  denominator (``FamilyOptions.attention_sinks``); norms multiply their
  weight in float32 (gpt-oss's RMSNorm, ``norm_fp32_product``);
- experts: ``num_experts`` (256) of ``moe_intermediate_size`` (512),
  ``num_experts_per_tok`` (6) per token: the top sigmoid scores of float32
  router logits, divided by their sum with ``norm_topk_prob`` (on)
  (``splitserve.engine.models.flint``), plus an ungated shared SwiGLU MLP
  of ``shared_expert_intermediate_size`` (1024) summed in;
  the ``mlp_only_layers`` ([0, 1]) and the layers off
  ``decoder_sparse_step`` have a dense MLP of ``intermediate_size``.

Refused: activations other than SiLU, fp8 checkpoints (untested:
the float32 router and sinks beside fp8 weights), tensor parallelism (the
sinks beside q/k norms and the sigmoid router are untested across ranks).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types

ARCH = "FlintForCausalLM"
# Llama's keys, as written, else transformers' FlintConfig default (None: left out)
_PASSED = {"vocab_size": 150144, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 49,
           "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
           "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "bos_token_id": None, "eos_token_id": None,
           "quantization_config": None}
_MOE = {"num_experts": 256, "num_experts_per_tok": 6, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 1024, "norm_topk_prob": True, "decoder_sparse_step": 1}


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as FlintConfig fills them."""
    n = int(cfg.get("num_hidden_layers") or _PASSED["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i < 2 or i % 4 == 1 or i == n - 1 else "sliding_attention"
                 for i in range(n)]
    return checked_layer_types(types, n, "flint")


def window(cfg: dict[str, Any]) -> int:
    size = cfg.get("sliding_window", 513)
    if size is None or int(size) <= 0:
        raise ValueError(f"sliding_window must be a positive integer, got {size!r}")
    return int(size)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    moe = {k: cfg.get(k, default) for k, default in _MOE.items()}
    only = cfg.get("mlp_only_layers")
    out.update(moe, mlp_only_layers=[0, 1] if only is None else list(only), qk_norm=True,
               attention_out_bias=bool(out["attention_bias"]), mlp_bias=False,
               use_sliding_window=True, sliding_window=window(cfg), layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the float32 router and sinks beside fp8 weights")
    full = tuple(i for i, t in enumerate(layer_types(cfg)) if t == "full_attention")
    return FamilyOptions(hidden_act=checked_activation(cfg, "flint"), attention_sinks=True,
                         norm_fp32_product=True, nope_layers=full,
                         tensor_parallel_refusal="its attention sinks beside per-head q/k norms and "
                                                 "the sigmoid router (Flint) are untested across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
