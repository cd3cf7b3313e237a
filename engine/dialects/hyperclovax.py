"""HyperCLOVA X SEED (``HyperCLOVAXForCausalLM``): its config.json, already
in Llama's keys, with transformers' HyperCLOVAXConfig defaults, and its
``FamilyOptions``.

Granite's decoder (``splitserve.engine.models.granite``) with two
differences:

- ``logits_scaling`` multiplies the output logits (Granite divides by it):
  ``FamilyOptions.logit_scale``;
- ``use_post_norm`` (default on): Peri-Layer Normalization, an RMSNorm on
  each attention and MLP output before ``residual_multiplier`` scales it
  into the residual stream (``post_norm1`` / ``post_norm2``; Gemma 2's
  sandwich norms, ``FamilyOptions.sandwich_norms``).

``embedding_multiplier`` and ``residual_multiplier`` (1.0 when absent) are
Granite's; ``attention_multiplier`` scales the attention scores, head_dim
** -0.5 when absent or null. ``attention_bias`` covers q/k/v and o_proj,
``mlp_bias`` the gated MLP's projections; RMSNorm eps 1e-6, 2048 positions,
bos 1, eos 2, untied embeddings by default; head_dim hidden_size / heads
unless given. Refused: a ``partial_rotary_factor`` other than 1 (every dim
rotates), activations other than the gated MLP's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_partial_rotary
from splitserve.engine.family_config import FamilyOptions, family_activation, parse_family_options

# Llama's keys, as written, else transformers' HyperCLOVAXConfig default (None: left out)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None,
           "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
           "head_dim": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None, "hidden_act": "silu",
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return passed_keys(cfg, _PASSED)


def options(cfg: dict[str, Any]) -> FamilyOptions:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    refuse_partial_rotary(cfg, rope if isinstance(rope, dict) else {}, "HyperCLOVAXForCausalLM")
    # Granite's four scalars, each checked positive (absent: 1.0)
    granite = parse_family_options({**cfg, "hidden_act": "silu"}, "granite")
    return dataclasses.replace(
        granite, hidden_act=family_activation(cfg, "hyperclovax"),
        attn_scale=granite.attn_scale if cfg.get("attention_multiplier") is not None else None,
        logits_divisor=1.0, logit_scale=granite.logits_divisor,
        sandwich_norms=bool(cfg.get("use_post_norm", True)))


DIALECT = Dialect(architectures=("HyperCLOVAXForCausalLM",), llama_keys=llama_keys, options=options)
