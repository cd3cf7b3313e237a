"""HunYuan dense V1 (``HunYuanDenseV1ForCausalLM``): its config.json in
Llama's keys, and its ``FamilyOptions``.

As transformers' HunYuanDenseV1Config and its model read it: the Llama
decoder whose per-head q/k RMSNorms (``query_layernorm`` /
``key_layernorm``, renamed at load: ``splitserve.engine.models.hunyuan``)
apply after RoPE (``FamilyOptions.qk_norm_after_rope``);
``attention_bias`` covers q/k/v and o_proj, the MLP has none;
``head_dim`` must be given (transformers' attention has no fallback for
it); eps 1e-5, untied embeddings, RoPE base 10000 by default. Its
"dynamic" rope scaling with an ``alpha`` is not Dynamic NTK but a fixed
larger base, ``rope_theta * alpha ** (head_dim / (head_dim - 2))``, which
the engine's default RoPE takes as its base; other scaling types as
Llama's. fp8 checkpoints are refused (their norm tensors are renamed at
load, an untested path).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, with transformers' HunYuanDenseV1Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "num_key_value_heads": None, "rope_theta": None,
           "rope_parameters": None, "rope_scaling": None, "attention_bias": False, "torch_dtype": None,
           "dtype": None, "bos_token_id": 1, "eos_token_id": 2, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "max_position_embeddings": 2048}


def ntk_alpha_rope(cfg: dict[str, Any], head_dim: int) -> dict[str, Any] | None:
    """The default-RoPE dict that HunYuan's "dynamic" scaling with ``alpha``
    amounts to (its base stretched once, whatever the length); None for any
    other rope dict, read as Llama's."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if not isinstance(rope, dict):
        return None  # none, or not a dict: refused where ModelConfig reads it
    kind = rope.get("rope_type") or rope.get("type")
    if kind != "dynamic" or not rope.get("alpha"):
        return None
    theta = rope.get("rope_theta")
    theta = float(cfg.get("rope_theta", 10000.0) if theta is None else theta)
    # Python float arithmetic, as transformers' compute_ntk_alpha_rope_parameters does it
    return {"rope_type": "default", "rope_theta": theta * rope["alpha"] ** (head_dim / (head_dim - 2))}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    head_dim = int(required(cfg, "head_dim"))
    out.update(head_dim=head_dim, attention_out_bias=bool(out["attention_bias"]), mlp_bias=False,
               qk_norm=True)
    alpha = ntk_alpha_rope(cfg, head_dim)
    if alpha is not None:
        out.pop("rope_scaling", None)
        out.update(rope_parameters=alpha, rope_theta=alpha["rope_theta"])
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "HunYuanDenseV1ForCausalLM", "q/k norm tensors are renamed at load")
    return FamilyOptions(hidden_act=family_activation(cfg, "hunyuan_v1_dense"), qk_norm_after_rope=True)


DIALECT = Dialect(architectures=("HunYuanDenseV1ForCausalLM",), llama_keys=llama_keys, options=options)
