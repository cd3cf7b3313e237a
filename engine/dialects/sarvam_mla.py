"""Sarvam MLA (``SarvamMLAForCausalLM``, sarvam-105b): DeepSeek-V3's model
(latent attention, grouped sigmoid router, ungated shared experts), read
from config.json as transformers' ``SarvamMLAConfig`` does (transformers
runs it as ``DeepseekV3ForCausalLM``, under DeepSeek-V3's tensor names).

What differs from ``splitserve.engine.dialects.deepseek_v3``:

- the original config's names are read too: ``num_experts``
  (``n_routed_experts``), ``num_shared_experts`` (``n_shared_experts``),
  ``num_mtp_layers`` (``num_nextn_predict_layers``); its ``q_head_dim`` and
  ``head_dim`` (derived values) are not read, and ``rope_scaling`` of type
  ``deepseek_yarn`` is YaRN (it replaces ``rope_parameters``, as there);
- defaults: 128 routed experts, one router group (``n_group`` and
  ``topk_group`` 1), the first layer dense, q straight from the hidden state
  (``q_lora_rank`` null), no multi-token-prediction layers.

Refused as DeepSeek-V3 refuses.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect
from splitserve.engine.dialects import deepseek_v3
from splitserve.engine.family_config import FamilyOptions

_OLD_NAMES = (("num_experts", "n_routed_experts"), ("num_shared_experts", "n_shared_experts"),
              ("num_mtp_layers", "num_nextn_predict_layers"))
# SarvamMLAConfig's defaults where they differ from DeepseekV3Config's
_DEFAULTS = {"n_routed_experts": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
             "num_nextn_predict_layers": 0}


def v3_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as DeepSeek-V3's config.json."""
    out = {k: v for k, v in cfg.items() if k not in ("q_head_dim", "head_dim")}
    for old, new in _OLD_NAMES:
        if old in cfg and new not in cfg:
            out[new] = cfg[old]
    for key, default in _DEFAULTS.items():
        if out.get(key) is None:
            out[key] = default
    out.setdefault("q_lora_rank", None)
    rope = cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and "deepseek_yarn" in (rope.get("type"), rope.get("rope_type")):
        del out["rope_scaling"]
        out["rope_parameters"] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "yarn"}
    return out


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return deepseek_v3.llama_keys(v3_config(cfg))


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return deepseek_v3.options(v3_config(cfg))


DIALECT = Dialect(architectures=("SarvamMLAForCausalLM",), llama_keys=llama_keys, options=options)
