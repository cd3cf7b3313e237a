"""Liquid LFM2 (``Lfm2ForCausalLM``, transformers' ``lfm2``): its config.json
in Llama's keys, and its ``FamilyOptions``; the helpers LFM2-MoE and LFM3
share (``splitserve.engine.dialects.lfm2_moe``, ``lfm3``).

As transformers' Lfm2Config and its model read it:

- ``layer_types``: each layer ``conv`` (a gated short convolution,
  ``splitserve.engine.models.short_conv``, its state in the engine's
  recurrent-state store) or ``full_attention``; without it the layers
  ``full_attn_idxs`` names attend (all of them when it is absent too);
- the convolution: ``conv_L_cache`` (3) taps, biases on in_proj, the
  convolution and out_proj with ``conv_bias``;
- attention: Llama's, q and k RMS-normed per head (``q_layernorm``,
  ``k_layernorm``) before RoPE (``rope_theta`` 1e6 by default), no biases,
  its output projection ``out_proj``;
- the SwiGLU MLP (``w1``, ``w3``, ``w2``), ``intermediate_size`` (or the
  older ``block_ff_dim``) adjusted with ``block_auto_adjust_ff_dim``: 2/3 of
  it, times ``block_ffn_dim_multiplier`` and rounded up to a multiple of
  ``block_multiple_of`` unless the multiplier is null;
- RMSNorms of ``norm_eps`` (1e-5): ``operator_norm`` before each mixer,
  ``ffn_norm`` before each MLP, ``embedding_norm`` after the last layer;
  embeddings tied by default (``tie_embedding``, its older name).

Refused: fewer than 2 convolution taps, layer types other than conv and
full_attention, fp8 checkpoints (their tensors are renamed at load), tensor
parallelism (the convolution layers are not sharded), LoRA adapters. A
hybrid model's engine caches prefixes with state checkpoints.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, HybridLayout
from splitserve.engine.lfm2_config import SHORT_CONV, Lfm2Shape

ARCH = "Lfm2ForCausalLM"
DEFAULT_ROPE_THETA = 1_000_000.0  # Lfm2Config.default_theta (LFM2-MoE and LFM3 share it)
# keys read as Llama's, with transformers' Lfm2Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 65536, "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 128_000, "head_dim": None,
           "rope_parameters": None, "rope_scaling": None, "torch_dtype": None, "dtype": None,
           "quantization_config": None, "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_MLP_WIDTH, DEFAULT_MULTIPLE_OF = 12288, 256  # Lfm2Config's intermediate_size, block_multiple_of


def mlp_width(cfg: dict[str, Any]) -> int:
    """Lfm2MLP's width: ``block_ff_dim`` (else ``intermediate_size``), adjusted
    as transformers adjusts it when ``block_auto_adjust_ff_dim``."""
    width = int(cfg.get("block_ff_dim") or cfg.get("intermediate_size") or DEFAULT_MLP_WIDTH)
    if not cfg.get("block_auto_adjust_ff_dim", True):
        return width
    width = int(2 * width / 3)
    multiplier = cfg.get("block_ffn_dim_multiplier", 1.0)  # null: neither scaled nor rounded
    if multiplier is not None:
        multiple = int(cfg.get("block_multiple_of") or DEFAULT_MULTIPLE_OF)
        width = int(float(multiplier) * width)
        width = multiple * ((width + multiple - 1) // multiple)
    return width


def layer_kinds(cfg: dict[str, Any], num_layers: int,
                attention_types: tuple[str, ...] = ("full_attention",)) -> tuple[str, ...]:
    """Each layer's kind from ``layer_types`` (``conv`` or one of
    ``attention_types``); without it, the layers LFM2's ``full_attn_idxs``
    names attend (every layer when it is absent too)."""
    types = cfg.get("layer_types")
    if types is None:
        idxs = cfg.get("full_attn_idxs")
        idxs = set(range(num_layers) if idxs is None else idxs)
        types = ["full_attention" if i in idxs else "conv" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted({t for t in types if t not in ("conv", *attention_types)})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported; supported: conv, "
                         f"{', '.join(attention_types)}")
    return tuple(SHORT_CONV if t == "conv" else ATTENTION for t in types)


def common_keys(cfg: dict[str, Any], passed: dict[str, Any], old_tie_key: bool = True) -> dict[str, Any]:
    """The Llama keys every LFM2 family gives alike: ``passed``, the norm
    epsilon, the tie (with ``old_tie_key``, ``tie_embedding`` first, as
    Lfm2Config and Lfm2MoeConfig pop it), the RoPE base's default, per-head
    q/k norms, no MLP biases."""
    out = passed_keys(cfg, passed)
    tied = cfg.get("tie_word_embeddings")
    if old_tie_key and "tie_embedding" in cfg:
        tied = cfg["tie_embedding"]
    out.update(rms_norm_eps=float(cfg.get("norm_eps") or 1e-5), tie_word_embeddings=tied is None or bool(tied),
               rope_theta=cfg.get("rope_theta") or DEFAULT_ROPE_THETA, qk_norm=True, mlp_bias=False)
    return out


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = common_keys(cfg, _PASSED)
    out.update(intermediate_size=mlp_width(cfg), attention_bias=False)
    return out


def lfm2_options(cfg: dict[str, Any], family: str, kinds: tuple[str, ...], conv_default: int,
                 **shape: Any) -> dict[str, Any]:
    """The FamilyOptions fields the LFM2 families share: the layout (None
    where no layer is a convolution) and the convolution's shape."""
    kernel = cfg.get("conv_L_cache")
    lfm2 = Lfm2Shape(hidden_size=int(cfg.get("hidden_size") or 0),
                     conv_kernel=int(conv_default if kernel is None else kernel),
                     conv_bias=bool(cfg.get("conv_bias", False)), **shape)
    hybrid = HybridLayout(kinds, lfm2.states()) if SHORT_CONV in kinds else None
    return dict(hidden_act="silu", hybrid=hybrid, lfm2=lfm2,
                tensor_parallel_refusal=f"{family}'s short convolution layers are not sharded across ranks")


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its tensors are renamed at load")
    full = {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}
    kinds = layer_kinds(cfg, int(full["num_hidden_layers"]))
    return FamilyOptions(**lfm2_options(full, "lfm2", kinds, 3))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
