"""A.X K1 (``AXK1ForCausalLM``): DeepSeek-V3 with a norm on each sparse
layer's mixture-of-experts output, read from config.json as transformers'
``AXK1Config`` does.

Attention: DeepSeek-V3's latent attention (``splitserve.engine.dialects.deepseek_v2``'s
keys, the softmax scale with YaRN's ``mscale_all_dim``), always through
q_a_proj / q_a_layernorm / q_b_proj (``q_lora_rank``, default 1536; null is
refused: transformers' AXK1Attention has no plain q_proj); ``kv_lora_rank``
512, ``qk_nope_head_dim`` 128, ``qk_rope_head_dim`` 64, ``v_head_dim`` 128;
the rope dims turned in adjacent pairs unless ``rope_interleave`` is false.
transformers sets ``head_dim`` to ``qk_rope_head_dim`` whatever config.json
writes, so a ``head_dim`` key is not read.

Experts: DeepSeek-V3's grouped sigmoid router (``splitserve.engine.dialects.glm4_moe``):
``n_routed_experts`` (192; ``num_local_experts`` its other name) of
``moe_intermediate_size`` (2048), ``num_experts_per_tok`` (8), ``n_group``
(8), ``topk_group`` (4), ``norm_topk_prob`` (on), ``routed_scaling_factor``
(2.5), the correction bias; ``n_shared_experts`` (1) as one ungated shared
MLP; then ``post_mlp_layernorm`` (RMSNorm, ``rms_norm_eps``) on the sum
(``splitserve.engine.models.axk1``). ``mlp_layer_types`` marks each layer
dense or sparse; without it a layer is sparse from ``first_k_dense_replace``
(1) on where its index is a multiple of ``moe_layer_freq`` (1), as
AXK1Config derives it. Defaults eps 1e-6, ``max_position_embeddings``
32768, untied embeddings.

``num_nextn_predict_layers`` (default 0) multi-token-prediction layers,
stored as the layers after the last, are skipped at load, and so is the
``post_mlp_layernorm`` the released checkpoints store for dense layers
(transformers ignores both). Refused: KV heads other than the head count, activations other than SiLU,
``partial_rotary_factor``, the router shapes GLM-4.5's refuses, fp8
checkpoints (untested here; ``weight_dtype: fp8`` quantizes at load instead)
and tensor parallelism (the output norm needs the experts' full sum, which
the ranks hold only after their all-reduce).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.deepseek_v2 import mla_options
from splitserve.engine.dialects.glm4_moe_lite import latent_moe_keys
from splitserve.engine.family_config import FamilyOptions

ARCH = "AXK1ForCausalLM"
# transformers' AXK1Config defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61,
             "num_attention_heads": 64, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False, "bos_token_id": 163691, "eos_token_id": 163691,
             "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
             "v_head_dim": 128}
_ROUTER_DEFAULTS = {"n_routed_experts": 192, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
_LAYER_TYPES = ("dense", "sparse")


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with ``_DEFAULTS`` and the router's filled in where absent."""
    out = {**_DEFAULTS, **_ROUTER_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:
        out["n_routed_experts"] = cfg["num_local_experts"]  # attribute_map's other name
    if cfg.get("q_lora_rank", 1) is None:
        raise ValueError(f"q_lora_rank null is not supported for {ARCH} (its attention always "
                         "projects q through q_a_proj / q_b_proj)")
    return out


def mlp_layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's MLP, "dense" or "sparse", as AXK1Config derives it."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("mlp_layer_types")
    if types is None:
        first, freq = int(cfg.get("first_k_dense_replace", 1)), int(cfg.get("moe_layer_freq", 1))
        if freq <= 0:
            raise ValueError(f"moe_layer_freq must be positive, got {freq}")
        return ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(n)]
    if len(types) != n or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"mlp_layer_types must give each of the {n} layers one of "
                         f"{', '.join(_LAYER_TYPES)}, got {types!r}")
    return list(types)


def _mtp_layers(cfg: dict[str, Any]) -> int:
    """``num_nextn_predict_layers`` (default 0): multi-token-prediction layers stored after
    the last decoder layer, skipped at load."""
    mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    if mtp < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {mtp}")
    return mtp


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _with_defaults(cfg)
    return latent_moe_keys(full, "axk1", ARCH, mlp_layer_types(full))


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the latent projections and experts beside the "
                          "float32 router")
    full = _with_defaults(cfg)
    mlp_layer_types(full)
    # moe_layer_freq is read above, into the layer types
    opts = mla_options({k: v for k, v in full.items() if k != "moe_layer_freq"}, "axk1", ARCH,
                       interleaved=bool(full.get("rope_interleave", True)), mtp_layers=_mtp_layers(cfg))
    return dataclasses.replace(opts, tensor_parallel_refusal=(
        "its norm on the experts' output needs their sum over every rank (A.X K1)"))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
