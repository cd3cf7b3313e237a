"""Google RecurrentGemma (``RecurrentGemmaForCausalLM``, transformers'
``recurrent_gemma``: Griffin): its config.json in Llama's keys, and its
``FamilyOptions``.

As transformers' RecurrentGemmaConfig and its model read it:

- ``block_types`` (recurrent, recurrent, attention) repeated over
  ``num_hidden_layers``: ``recurrent`` layers hold Griffin's recurrent block
  (``splitserve.engine.models.rg_lru``: ``lru_width`` (hidden_size) wide, a
  causal convolution of ``conv1d_width`` (4) taps with a bias, the RG-LRU
  with gates block-diagonal over ``num_attention_heads`` blocks; its states
  in the engine's recurrent-state store), ``attention`` layers local
  attention over a window of ``attention_window_size`` (2048);
- attention: ``num_key_value_heads`` (all heads when absent; 1 in the
  released checkpoints) KV heads of hidden_size / heads (a ``head_dim`` key
  is not read), q/k/v biases by ``attention_bias``, o_proj always biased;
  ``partial_rotary_factor`` (0.5, in ``rope_parameters`` or at top level) of
  each head rotated rotate-half with base ``rope_theta`` (1e4);
- Gemma's RMSNorm (1 + weight) of ``rms_norm_eps`` (1e-6), embeddings scaled
  by sqrt(hidden_size) rounded to bfloat16 (transformers' ``normalizer``
  buffer) and tied; the GeGLU MLP of ``intermediate_size`` / 2 with biases;
  ``hidden_activation`` (gelu_pytorch_tanh) in the MLP and the recurrent
  block's gate branch; logits soft-capped at ``logits_soft_cap`` (30).

transformers has no position limit (the attention is local); the engine's
RoPE table spans ``max_position_embeddings``, 8192 (the released models'
training length) when absent.

Refused: block types other than recurrent and attention, layouts without a
recurrent or without an attention layer, other activations, RoPE types
other than default, a missing or non-positive soft cap, fp8 checkpoints
(tensors renamed and fused at load), tensor parallelism (the recurrent
blocks are not sharded), LoRA adapters. A hybrid model's engine caches
prefixes with state checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.glm import rotary_dim
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, HybridLayout
from splitserve.engine.recurrent_gemma_config import RG_LRU, RgLruShape

ARCH = "RecurrentGemmaForCausalLM"
# keys read as Llama's, with transformers' RecurrentGemmaConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 256_000, "hidden_size": 2560, "num_hidden_layers": 26, "num_attention_heads": 10,
           "num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
           "attention_bias": False, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": 2, "eos_token_id": 1}
DEFAULT_MLP_WIDTH, DEFAULT_MAX_POSITION, DEFAULT_WINDOW = 3 * 2560, 8192, 2048
DEFAULT_BLOCK_TYPES = ("recurrent", "recurrent", "attention")
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}  # hidden_activation -> the MLP's


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}


def layer_kinds(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Each layer's kind: ``block_types`` repeated over the layers, as
    RecurrentGemmaConfig.layers_block_type repeats it."""
    n = int(_merged(cfg)["num_hidden_layers"])
    types = list(cfg.get("block_types") or DEFAULT_BLOCK_TYPES)
    unknown = sorted({t for t in types if t not in ("recurrent", "attention")})
    if unknown:
        raise ValueError(f"block_types {unknown} are not supported for recurrent_gemma; supported: "
                         "recurrent, attention")
    kinds = tuple(RG_LRU if t == "recurrent" else ATTENTION for t in (types * n)[:n])
    if ATTENTION not in kinds or RG_LRU not in kinds:
        raise ValueError(f"block_types {types} over {n} layers leave no "
                         f"{'attention' if ATTENTION not in kinds else 'recurrent'} layer; RecurrentGemma "
                         "is served with both")
    return kinds


def _window(cfg: dict[str, Any]) -> int:
    window = cfg.get("attention_window_size", cfg.get("sliding_window", DEFAULT_WINDOW))
    if window is None or int(window) <= 0:
        raise ValueError(f"attention_window_size must be positive, got {window!r}")
    return int(window)


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported for recurrent_gemma; supported: default")
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or 10_000.0)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _merged(cfg)
    out = passed_keys(cfg, _PASSED)
    hidden, heads = int(full["hidden_size"]), int(full["num_attention_heads"])
    kinds = layer_kinds(cfg)
    mlp_width = int(full.get("intermediate_size", DEFAULT_MLP_WIDTH)) // 2  # RecurrentGemmaMlp halves it
    out.update(head_dim=hidden // heads, intermediate_size=mlp_width,
               max_position_embeddings=int(full.get("max_position_embeddings", DEFAULT_MAX_POSITION)),
               rope_theta=_rope_theta(cfg), attention_out_bias=True, mlp_bias=True, qk_norm=False,
               use_sliding_window=True, sliding_window=_window(cfg),
               layer_types=["sliding_attention" if k == ATTENTION else "full_attention" for k in kinds])
    return out


def embed_scale(hidden: int) -> float:
    """sqrt(hidden_size) rounded to bfloat16, as transformers' ``normalizer``
    buffer holds it whatever the model's dtype."""
    return float(torch.tensor(math.sqrt(hidden), dtype=torch.bfloat16))


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed and fused at load")
    full = _merged(cfg)
    act = full.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_activation {act!r} is not supported for recurrent_gemma; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    cap = cfg.get("logits_soft_cap", 30.0)
    if cap is None or float(cap) <= 0:
        raise ValueError(f"logits_soft_cap must be positive, got {cap!r}")
    hidden, heads = int(full["hidden_size"]), int(full["num_attention_heads"])
    shape = RgLruShape(lru_width=int(full.get("lru_width", hidden)), num_heads=heads,
                       conv_kernel=int(full.get("conv1d_width", 4)))
    kinds = layer_kinds(cfg)
    return FamilyOptions(
        hidden_act=ACTIVATIONS[act], norm_plus_one=True, norm_fp32_product=True,
        embed_scale=embed_scale(hidden), final_softcap=float(cap), rotary_dim=rotary_dim({**full, "head_dim": None}, default_head_dim=None),
        hybrid=HybridLayout(kinds, shape.states()), rg_lru=shape,
        tensor_parallel_refusal="recurrent_gemma's recurrent blocks are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
