"""GraniteMoeSWA (``GraniteMoeSWAForCausalLM``): GraniteMoeShared's
config.json (``splitserve.engine.dialects.granitemoe``: Granite's
multipliers, ``num_local_experts`` experts of ``intermediate_size``, top
``num_experts_per_tok`` softmax-ed among themselves, a dense SwiGLU
``shared_mlp`` of ``shared_intermediate_size`` beside them, 0: none) with
Granite SWA's attention (``splitserve.engine.dialects.granite_swa``):
``layer_types`` / ``sliding_window`` (default 128; without ``layer_types``
every fourth layer from layer 0 is full), a sink per query head, and
``layer_rope_theta`` (per-layer RoPE bases, 0: no RoPE).

Its checkpoints store the experts as transformers' ``GraniteMoeSWAExperts``
holds them (``block_sparse_moe.experts.gate_up_proj`` [E, 2I, hidden],
``experts.down_proj`` [E, hidden, I], ``router.weight``), split at load
(``splitserve.engine.models.granitemoe_swa``); fp8 checkpoints of them are
refused (``weight_dtype: fp8`` quantizes an unquantized checkpoint at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects import granitemoe
from splitserve.engine.dialects.granite_swa import swa_options, window_keys
from splitserve.engine.family_config import FamilyOptions


# GraniteMoeSWAConfig's defaults where they are not the Llama-style reading's
_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "bos_token_id": 1, "eos_token_id": 2}


def _filled(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_DEFAULTS, **{k: v for k, v in cfg.items() if k not in _DEFAULTS or v is not None}}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    refuse_fp8_checkpoint(cfg, "GraniteMoeSWA", "fused gate_up_proj / down_proj experts")
    cfg = _filled(cfg)
    out = granitemoe.SHARED_DIALECT.llama_keys(cfg)  # without any window key
    return {**out, **window_keys(cfg, int(cfg["num_hidden_layers"]), "granitemoe_swa")}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    cfg = _filled(cfg)
    return swa_options(granitemoe.options(cfg), cfg, int(cfg["num_hidden_layers"]))


DIALECT = Dialect(architectures=("GraniteMoeSWAForCausalLM",), llama_keys=llama_keys, options=options)
