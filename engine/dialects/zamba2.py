"""Zyphra's Zamba2 (``Zamba2ForCausalLM``, transformers' ``zamba2``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' Zamba2Config and its model read it:

- ``layers_block_type``: every layer is a Mamba-2 layer
  (``splitserve.engine.models.mamba2``); a ``hybrid`` layer first runs a
  shared attention + MLP block on its input concatenated with the original
  embeddings (``splitserve.engine.models.zamba2``), so it keeps a state and a
  KV cache slice of its own (kind ``HYBRID_KIND``); the default pattern is
  the 2.7B model's (54 layers);
- Mamba-2: ``n_mamba_heads`` (8) heads of ``mamba_expand`` (2) x
  hidden_size over the heads, ``mamba_ngroups`` (1) groups of B and C of
  ``mamba_d_state`` (64), a convolution of ``mamba_d_conv`` (4) taps always
  with a bias (``use_conv_bias`` is not read by the model), in/out
  projection biases by ``add_bias_linear``; dt clamped below at
  ``time_step_min`` (0.001); the gated norm gates before normalising, over
  ``mamba_ngroups`` groups, with epsilon 1e-5;
- the shared blocks: ``num_mem_blocks`` (1) of them, used in turn by the
  hybrid layers; attention over 2 x hidden_size inputs in
  ``num_attention_heads`` heads of 2 x hidden_size / heads, scores scaled by
  (head_dim / 2) ** -0.5, RoPE only with ``use_mem_rope``; per use, LoRA-like
  adapters of ``adapter_rank`` (128) on q/k/v (``use_shared_attention_adapter``)
  and always on the MLP's fused gate_up; the MLP of ``intermediate_size``
  (4 x hidden_size) with ``hidden_act`` (gelu); each use's output through its
  own ``linear``;
- ``rms_norm_eps`` 1e-5; embeddings tied by default.

Refused: a model without hybrid layers, unknown layer types, q/k/v
adapters with fewer key/value heads than heads (transformers cannot add
them either), activations other than gelu / silu, ``use_long_context``, fp8
checkpoints (fused and shared tensors), tensor parallelism, LoRA on the
model's own per-use adapters. LoRA adapters apply to every layer's Mamba-2
mixer (``in_proj`` / ``out_proj``) and, per hybrid layer, to its
``linear`` and its use of the shared block (q/k/v/o, ``gate_up_proj``,
``down_proj``), as PEFT trains them on transformers' per-use modules.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import HybridLayout
from splitserve.engine.mamba2_config import SSM_KIND, Mamba2Shape
from splitserve.engine.zamba2_config import Zamba2Blocks

ARCH = "Zamba2ForCausalLM"
HYBRID_KIND = "zamba2_hybrid"  # a Mamba-2 layer after a use of a shared attention block
ACTIVATIONS = ("gelu", "silu")
# keys read as Llama's, with transformers' Zamba2Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 32000, "hidden_size": 2560, "num_hidden_layers": 54, "num_attention_heads": 32,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "rope_parameters": None, "rope_scaling": None, "rope_theta": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": 1, "eos_token_id": 2}
_LAYER_KINDS = {"mamba": SSM_KIND, "linear_attention": SSM_KIND, "hybrid": HYBRID_KIND}
_DEFAULT_TYPES = (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3
                  + ["hybrid"] + ["mamba"] * 2)


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}


def layer_kinds(cfg: dict[str, Any]) -> tuple[str, ...]:
    types = cfg.get("layers_block_type") or cfg.get("layer_types") or _DEFAULT_TYPES
    num_layers = int(_merged(cfg)["num_hidden_layers"])
    if len(types) != num_layers:
        raise ValueError(f"layers_block_type has {len(types)} entries for {num_layers} layers")
    unknown = sorted({str(t) for t in types if t not in _LAYER_KINDS})
    if unknown:
        raise ValueError(f"layers_block_type {unknown} are not supported; supported: mamba, hybrid")
    kinds = tuple(_LAYER_KINDS[t] for t in types)
    if HYBRID_KIND not in kinds:
        raise ValueError("layers_block_type has no hybrid layer; a model of Mamba-2 layers only is not supported")
    return kinds


def head_dim(cfg: dict[str, Any]) -> int:
    """``attention_head_dim`` as config.json gives it (transformers' saved value wins
    over the one it derives), else 2 x hidden_size / heads: the heads span the
    concatenated input."""
    m = _merged(cfg)
    given = cfg.get("attention_head_dim") or cfg.get("head_dim")
    return int(given) if given else 2 * int(m["hidden_size"]) // int(m["num_attention_heads"])


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    m = _merged(cfg)
    hidden, heads = int(m["hidden_size"]), int(m["num_attention_heads"])
    out.update(intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
               num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
               head_dim=head_dim(cfg),
               qk_norm=False, attention_bias=False, attention_out_bias=False,
               mlp_bias=bool(cfg.get("add_bias_linear", False)))
    return out


def mamba2_shape(cfg: dict[str, Any], hidden: int) -> Mamba2Shape:
    heads, inner = int(cfg.get("n_mamba_heads", 8)), int(cfg.get("mamba_expand", 2) * hidden)
    if inner % heads:
        raise ValueError(f"n_mamba_heads {heads} must divide mamba_expand x hidden_size ({inner})")
    return Mamba2Shape(num_heads=heads, head_dim=inner // heads, n_groups=int(cfg.get("mamba_ngroups", 1)),
                       state_size=int(cfg.get("mamba_d_state", 64)), conv_kernel=int(cfg.get("mamba_d_conv", 4)),
                       conv_bias=True, proj_bias=bool(cfg.get("add_bias_linear", False)),
                       time_step_limit=(float(cfg.get("time_step_min", 0.001)), math.inf), norm_eps=1e-5)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its shared blocks' fused tensors are not read in fp8")
    if cfg.get("use_long_context"):
        raise ValueError(f"use_long_context is not supported for {ARCH}")
    act = cfg.get("hidden_act") or "gelu"
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not supported for {ARCH}; supported: {', '.join(ACTIVATIONS)}")
    m = _merged(cfg)
    heads = int(m["num_attention_heads"])
    wide = 2 * int(m["hidden_size"])
    if int(cfg.get("attention_hidden_size") or wide) != wide:
        raise ValueError(f"attention_hidden_size {cfg['attention_hidden_size']} is not supported for {ARCH} "
                         f"(the blocks take the {wide}-wide concatenation of the input and the embeddings)")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if cfg.get("use_shared_attention_adapter") and (kv_heads != heads or heads * head_dim(cfg) != wide):
        raise ValueError("use_shared_attention_adapter needs num_key_value_heads = num_attention_heads and "
                         f"heads x attention_head_dim = 2 x hidden_size for {ARCH} (each q/k/v adapter is "
                         f"{wide} wide)")
    shape = mamba2_shape(cfg, int(m["hidden_size"]))
    return FamilyOptions(
        hidden_act=act, final_norm_name="model.final_layernorm",
        hybrid=HybridLayout(layer_kinds(cfg), shape.states(), attending_kinds=(HYBRID_KIND,)), mamba2=shape,
        zamba2=Zamba2Blocks(num_blocks=int(cfg.get("num_mem_blocks", 1)), adapter_rank=int(cfg.get("adapter_rank", 128)),
                            qkv_adapters=bool(cfg.get("use_shared_attention_adapter", False)),
                            rope=bool(cfg.get("use_mem_rope", False))),
        tensor_parallel_refusal="zamba2's recurrent (Mamba-2) layers and shared blocks are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
