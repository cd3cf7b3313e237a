"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; Kimi K2 and other derivatives ship
as it): DeepSeek-V2's multi-head latent attention with GLM-4.5's grouped
sigmoid router, read from config.json as transformers' ``DeepseekV3Config``
does.

Attention: as ``splitserve.engine.dialects.deepseek_v2`` reads it (same
keys and defaults, the softmax scale with YaRN's ``mscale_all_dim``), the
rope dims turned in adjacent pairs unless ``rope_interleave`` is false
(then rotate-half).

Experts: ``n_routed_experts`` (256) of ``moe_intermediate_size`` (2048),
``num_experts_per_tok`` (8) per token by the grouped sigmoid router
(``splitserve.engine.models.grouped_router``: ``n_group`` (8),
``topk_group`` (4), ``norm_topk_prob`` (on), ``routed_scaling_factor``
(2.5), the checkpoint's ``mlp.gate.e_score_correction_bias``);
``n_shared_experts`` (1) as one ungated shared MLP; the first
``first_k_dense_replace`` (3) layers dense. ``topk_method`` and
``scoring_func`` are not read (transformers' V3 router is always this one).
No MLP biases; defaults ``max_position_embeddings`` 4096, eps 1e-6.

``num_nextn_predict_layers`` (``num_mtp_layers``, default 1)
multi-token-prediction layers, stored as the layers after the last, are
skipped at load, as transformers skips them. fp8 checkpoints load as
DeepSeek-V2's do (DeepSeek-V3's and Kimi K2's own releases are 128x128
block-fp8). Refused as for DeepSeek-V2 (KV heads, ``moe_layer_freq``,
activation, ``partial_rotary_factor``), and the router shapes GLM-4.5's
refuses. DeepSeek-V3.2
(``DeepseekV32ForCausalLM``, its sparse indexer) is another architecture and
stays unsupported.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.dialects.deepseek_v2 import COPIED, attention_keys, mla_options
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.family_config import FamilyOptions

ARCH = "DeepseekV3ForCausalLM"
# transformers' DeepseekV3Config defaults, where config.json has no such key
_DEFAULTS = {"max_position_embeddings": 4096}
_ROUTER_DEFAULTS = {"n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
                    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    router = {**_ROUTER_DEFAULTS, **{k: v for k, v in cfg.items() if k in _ROUTER_DEFAULTS}}
    if cfg.get("num_local_experts") is not None:  # the config class's other name for it
        router["n_routed_experts"] = cfg["num_local_experts"]
    return {**passed_keys(cfg, {**{k: None for k in COPIED}, **_DEFAULTS}), **attention_keys(cfg, ARCH),
            **moe_keys({**cfg, **router}, "deepseek_v3", first_dense=3, norm_topk=True), "mlp_bias": False}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    mtp = int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 1)) or 0)
    if mtp < 0:
        raise ValueError(f"num_nextn_predict_layers must be >= 0, got {mtp}")
    return mla_options(cfg, "deepseek_v3", ARCH, interleaved=bool(cfg.get("rope_interleave", True)),
                       mtp_layers=mtp)


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
