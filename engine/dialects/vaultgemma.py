"""VaultGemma (``VaultGemmaForCausalLM``): its config.json in Llama's keys, and
its ``FamilyOptions``.

transformers' VaultGemma is Gemma 2 (``VaultGemmaConfig`` has Gemma 2's keys
and defaults) without the norms after attention and after the MLP: each layer
is ``x + attn(input_layernorm(x))``, then ``x + mlp(pre_feedforward_layernorm(x))``.
So it takes Gemma 2's options (``(1 + w)`` norms, scaled embeddings, GeGLU,
``query_pre_attn_scalar``, score and logit soft caps) with ``sandwich_norms``
off; ``splitserve.engine.models.vaultgemma`` loads ``pre_feedforward_layernorm``
as the pre-MLP norm. A window of ``sliding_window`` (default 4096) on the
layers ``layer_types`` marks (by default every other layer from layer 0);
defaults ``head_dim`` 256, eps 1e-6, tied embeddings, soft caps 50 (scores)
and 30 (logits). fp8 checkpoints are
refused (a norm is renamed at load).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions, checked_layer_types, parse_family_options

# transformers' VaultGemmaConfig defaults, where config.json has no such key
_DEFAULTS = {"head_dim": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
             "sliding_window": 4096, "bos_token_id": 2, "eos_token_id": 1}
# its soft caps when config.json has no such key (null: none)
_CAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as VaultGemmaConfig derives them (layer 0 slides, then every other)."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    types = checked_layer_types(types, n, "vaultgemma")
    if cfg.get("sliding_window", _DEFAULTS["sliding_window"]) is None and "sliding_attention" in types:
        raise ValueError("sliding_window is null but layer_types has sliding_attention layers")
    return types


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**cfg, **{k: cfg.get(k, default) for k, default in _DEFAULTS.items()}}
    out.update(mlp_bias=False, use_sliding_window=out["sliding_window"] is not None,
               layer_types=layer_types(cfg))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "VaultGemmaForCausalLM", "a norm is renamed at load")
    caps = {k: cfg.get(k, default) for k, default in _CAPS.items()}
    return dataclasses.replace(parse_family_options({**cfg, **caps}, "gemma2"), sandwich_norms=False)


DIALECT = Dialect(architectures=("VaultGemmaForCausalLM",), llama_keys=llama_keys, options=options)
