"""nanochat (``NanoChatForCausalLM``): its config.json, already in Llama's
keys, with transformers' NanoChatConfig defaults, and its ``FamilyOptions``.

Llama's decoder with weightless RMSNorms (eps ``rms_norm_eps``, 1e-6), one of
them also on the token embeddings; q and k RMS-normed per head, without weight,
after a RoPE that turns the other way; the ungated MLP ``fc1 -> hidden_act ->
fc2`` (default relu2, no biases); the logits soft-capped at
``final_logit_softcapping`` (15; null: none); q/k/v/o biases per
``attention_bias``; untied embeddings by default
(``splitserve.engine.models.nanochat``). Tensor parallelism splits it as
Llama's (the weightless norms need no part; q/k rows are negated per head).
Refused: a ``partial_rotary_factor`` other than 1, fp8 checkpoints (q/k rows
negated at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (
    Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, refuse_partial_rotary,
)
from splitserve.engine.family_config import FamilyOptions

# Llama's keys, as written, else transformers' NanoChatConfig default (None: left out)
_PASSED = {"vocab_size": 50304, "hidden_size": 768, "intermediate_size": 8192,
           "num_hidden_layers": 12, "num_attention_heads": 6, "num_key_value_heads": None,
           "head_dim": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "torch_dtype": None, "dtype": None, "quantization_config": None,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out.setdefault("num_key_value_heads", out["num_attention_heads"])
    return {**out, "mlp_bias": False, "qk_norm": False}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "NanoChatForCausalLM", "its q/k rows are negated at load")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or {}, "NanoChatForCausalLM")
    cap = cfg.get("final_logit_softcapping", 15.0)
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "nanochat", "relu2", key="hidden_act"),
        plain_mlp=("fc1", "fc2"), final_softcap=float(cap or 0.0), rope_qk_l2_norm=True)


DIALECT = Dialect(architectures=("NanoChatForCausalLM",), llama_keys=llama_keys, options=options)
