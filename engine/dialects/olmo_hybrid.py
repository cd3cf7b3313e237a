"""OLMo Hybrid (``OlmoHybridForCausalLM``, transformers' ``olmo_hybrid``): its
config.json in Llama's keys, and its ``FamilyOptions``.

As transformers' OlmoHybridConfig and its model read it:

- ``layer_types``: each layer ``linear_attention`` (a Gated DeltaNet layer,
  ``splitserve.engine.models.olmo_hybrid``) or ``full_attention``; without it
  every fourth layer attends (the last one when there are fewer than four);
  at least one of each;
- the attention layers are OLMo 3's: norms after attention and after the
  MLP (``post_norms``), q/k RMS-normed over all heads at once
  (``full_qk_norm``), every dim of ``hidden_size / num_attention_heads``
  rotated, or none where the rope dict's ``rope_theta`` is null (NoPE, as
  the released checkpoints ship); the Gated DeltaNet layers are pre-norm;
  every RMSNorm multiplies its weight into the float32 row;
- Gated DeltaNet: ``linear_num_key_heads`` / ``linear_num_value_heads``
  (default ``num_attention_heads``) heads of ``linear_key_head_dim`` (0.75 x
  hidden_size / key heads) / ``linear_value_head_dim`` (twice that), a
  convolution of ``linear_conv_kernel_dim`` (4) taps, beta doubled with
  ``linear_allow_neg_eigval`` (true), its output norm's epsilon 1e-5;
- defaults: 32 layers of 3840, 30 heads (KV heads as many), MLP 11008,
  vocabulary 100352, eos 100257, ``rms_norm_eps`` 1e-6, untied embeddings.

Refused: activations other than SiLU, ``partial_rotary_factor``, a
convolution of fewer than 2 taps, fp8 checkpoints (untested), tensor
parallelism (its q/k norms span every head). LoRA adapters take its
projections.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions
from splitserve.engine.hybrid_config import ATTENTION, GatedDeltaNetShape, HybridLayout

ARCH = "OlmoHybridForCausalLM"
GATED_DELTA_NET = "gated_delta_net"
DEFAULT_THETA = 10000.0
# keys read as Llama's, with OlmoHybridConfig's defaults (None: left out when absent)
_PASSED = {"vocab_size": 100352, "hidden_size": 3840, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 30, "num_key_value_heads": None, "max_position_embeddings": 65536,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "bos_token_id": None,
           "eos_token_id": 100257}


def merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}


def layer_kinds(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Each layer's kind from ``layer_types`` or OlmoHybridConfig's default."""
    n = int(merged(cfg)["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
        if "full_attention" not in types:
            types[-1] = "full_attention"
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
    kinds = {"full_attention": ATTENTION, "linear_attention": GATED_DELTA_NET}
    unknown = sorted({t for t in types if t not in kinds})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported; supported: full_attention, linear_attention")
    if len(set(types)) < 2:
        raise ValueError(f"layer_types must hold both full_attention and linear_attention layers, got only "
                         f"{types[0]} (as transformers' OlmoHybridConfig requires)")
    return tuple(kinds[t] for t in types)


def rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the rope dict as transformers standardises it, whether the layers rotate:
    not where its rope_theta is written null)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    refuse_partial_rotary(cfg, params, "olmo_hybrid")
    if "rope_theta" not in params:
        params["rope_theta"] = cfg["rope_theta"] if "rope_theta" in cfg else DEFAULT_THETA
    params.setdefault("rope_type", params.pop("type", "default"))
    rotates = params["rope_theta"] is not None
    return ({**params, "rope_theta": params["rope_theta"] if rotates else DEFAULT_THETA}, rotates)


def gated_delta_net_shape(cfg: dict[str, Any]) -> GatedDeltaNetShape:
    full = merged(cfg)
    heads = int(full["num_attention_heads"])
    k_heads = int(full.get("linear_num_key_heads") or heads)
    k_dim = int(full.get("linear_key_head_dim") or int(0.75 * int(full["hidden_size"]) / k_heads))
    kernel = int(full.get("linear_conv_kernel_dim") or 4)
    if kernel < 2:
        raise ValueError(f"linear_conv_kernel_dim {kernel} is not supported (at least 2 taps)")
    neg = cfg.get("linear_allow_neg_eigval")
    return GatedDeltaNetShape(num_k_heads=k_heads, num_v_heads=int(full.get("linear_num_value_heads") or heads),
                              k_head_dim=k_dim, v_head_dim=int(full.get("linear_value_head_dim") or 2 * k_dim),
                              conv_kernel=kernel, fused_projections=False,
                              beta_scale=2.0 if neg is None or neg else 1.0, norm_eps=1e-5)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = merged(cfg)
    out = passed_keys(cfg, _PASSED)
    # OlmoHybridConfig has no head_dim key, but its attention reads one config.json holds
    out.update(head_dim=int(full.get("head_dim") or int(full["hidden_size"]) // int(full["num_attention_heads"])),
               rope_parameters=rope(cfg)[0], qk_norm=True, mlp_bias=False)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: its tensors are renamed and its convolution joined at load")
    kinds = layer_kinds(cfg)
    shape = gated_delta_net_shape(cfg)
    rotates = rope(cfg)[1]
    return FamilyOptions(
        hidden_act=checked_activation(cfg, "olmo_hybrid"), post_norms=True, full_qk_norm=True,
        norm_fp32_product=True, hybrid=HybridLayout(kinds, shape.states()), gated_delta_net=shape,
        nope_layers=() if rotates else tuple(i for i, k in enumerate(kinds) if k == ATTENTION),
        tensor_parallel_refusal="olmo_hybrid's recurrent (Gated DeltaNet) layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
