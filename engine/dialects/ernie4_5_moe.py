"""ERNIE 4.5 MoE (``Ernie4_5_MoeForCausalLM``): its config.json in Llama's
keys, and its ``FamilyOptions``.

As transformers' Ernie4_5_MoeConfig and its model read it: the dense
ERNIE 4.5 decoder (``splitserve.engine.dialects.ernie4_5``: ``use_bias`` on
every attention and MLP projection and on the vocabulary projection, RoPE
on adjacent dim pairs) with a sparse MLP in the layers ``i`` where
``(i + 1) % moe_layer_interval == 0`` and ``moe_layer_start_index <= i <=
moe_layer_end_index`` (-1: the last layer), the others keeping a dense MLP
of ``intermediate_size``:

- ``moe_num_experts`` (64) bias-free SwiGLU experts of
  ``moe_intermediate_size`` (1536), ``moe_k`` (6) per token, routed in
  float32 (``MoEConfig.corrected_softmax_norm_min``,
  ``splitserve.engine.models.ernie4_5_moe``): softmax over the router
  logits, the top k of those probabilities plus the checkpoint's
  ``moe_statics.e_score_correction_bias`` chosen, their unbiased
  probabilities divided by their sum clamped below at ``moe_norm_min``;
- ``moe_num_shared_experts`` (2): one ungated MLP of
  ``moe_intermediate_size * moe_num_shared_experts`` every token runs.

Defaults: 4 KV heads, ``head_dim`` hidden_size / heads, eps 1e-5, tied
embeddings, RoPE base 500000. Multi-token-prediction tensors (``mtp``) are
skipped at load, as transformers skips them. Refused: rotary over part of
each head, activations other than SiLU, fp8 checkpoints (q/k rows are
reordered at load), tensor parallelism (untested).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.ernie4_5 import ernie_keys, rope_params
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions

# keys read as Llama's, with transformers' Ernie4_5_MoeConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
           "num_attention_heads": 20, "num_key_value_heads": 4, "head_dim": None,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None, "torch_dtype": None,
           "dtype": None, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "max_position_embeddings": 131072}


def _int(cfg: dict[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer for ernie4_5_moe, got {value!r}")
    return value


def moe_keys(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The experts, shared experts, sparse layers and router in Llama-style keys."""
    interval = _int(cfg, "moe_layer_interval", 1)
    if interval <= 0:
        raise ValueError(f"moe_layer_interval must be positive, got {interval}")
    start, end = _int(cfg, "moe_layer_start_index", 1), _int(cfg, "moe_layer_end_index", -1)
    end = num_layers - 1 if end == -1 else end
    expert_size, shared = _int(cfg, "moe_intermediate_size", 1536), _int(cfg, "moe_num_shared_experts", 2)
    norm_min = float(cfg.get("moe_norm_min", 1e-12) or 0.0)
    return {
        "num_experts": _int(cfg, "moe_num_experts", 64),
        "num_experts_per_tok": _int(cfg, "moe_k", 6),
        "moe_intermediate_size": expert_size,
        "decoder_sparse_step": interval,
        "mlp_only_layers": [i for i in range(num_layers) if not start <= i <= end],
        "shared_expert_intermediate_size": expert_size * max(shared, 0),
        "moe_routing": {"corrected_softmax_norm_min": norm_min},
    }


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = ernie_keys(cfg, _PASSED)
    out.update(moe_keys(cfg, int(out["num_hidden_layers"])))
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "Ernie4_5_MoeForCausalLM", "q/k rows are reordered at load")
    refuse_partial_rotary(cfg, rope_params(cfg), "ernie4_5_moe")
    return FamilyOptions(hidden_act=checked_activation(cfg, "ernie4_5_moe"), interleaved_rope=True,
                         lm_head_bias=bool(cfg.get("use_bias", False)),
                         tensor_parallel_refusal="its correction-biased router (ERNIE 4.5 MoE) is "
                                                 "untested across ranks")


DIALECT = Dialect(architectures=("Ernie4_5_MoeForCausalLM",), llama_keys=llama_keys, options=options)
