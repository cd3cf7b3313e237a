"""InternLM3 (``InternLM3ForCausalLM``): its config.json, in Llama's keys
but for its biases, with transformers' InternLM3Config defaults.

transformers runs InternLM3 as Llama (``LlamaForCausalLM`` on an
``InternLM3Config``), reading ``qkv_bias`` as Llama's ``attention_bias``
(q/k/v and o_proj) and ``bias`` as ``mlp_bias``, and refusing the two
apart; so does this dialect. The newer names (``attention_bias``,
``mlp_bias``, as transformers writes them back) are read where the hub
names are absent. Defaults: ``head_dim`` 128 (null: hidden_size /
num_attention_heads), 2 KV heads (null: one per query head), eps 1e-5,
32768 positions, untied embeddings, bos 1, eos 2; RoPE (its checkpoints
use "dynamic" scaling) as Llama's. Tensor names are Llama's, so the shared
decoder loads it as it is, LoRA adapters, fp8 checkpoints and tensor
parallelism included.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, with transformers' InternLM3Config defaults (None: left out when absent)
_PASSED = {"vocab_size": None, "hidden_size": None, "intermediate_size": None, "num_hidden_layers": None,
           "num_attention_heads": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "partial_rotary_factor": None, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}


def _bias(cfg: dict[str, Any], hub_key: str, key: str) -> bool:
    # the hub name wins, as transformers' attribute_map makes it an alias of the other
    value = cfg.get(hub_key)
    return bool(cfg.get(key, False) if value is None else value)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    qkv_bias, bias = _bias(cfg, "qkv_bias", "attention_bias"), _bias(cfg, "bias", "mlp_bias")
    if qkv_bias != bias:
        raise ValueError(f"InternLM3 with qkv_bias ({qkv_bias}) different from bias ({bias}) is not "
                         "supported (transformers runs it as Llama, one switch for every projection)")
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim", 128)
    kv_heads = cfg.get("num_key_value_heads", 2)
    return {**passed_keys(cfg, _PASSED),
            "head_dim": int(head_dim) if head_dim is not None else int(cfg["hidden_size"]) // heads,
            "num_key_value_heads": int(kv_heads) if kv_heads is not None else heads,
            "attention_bias": qkv_bias, "attention_out_bias": qkv_bias, "mlp_bias": bias}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=family_activation(cfg, "internlm3"))


DIALECT = Dialect(architectures=("InternLM3ForCausalLM",), llama_keys=llama_keys, options=options)
