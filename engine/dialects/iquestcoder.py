"""IQuest-Coder (``IQuestCoderForCausalLM``): its config.json in Llama's keys, as
transformers' ``IQuestCoderConfig`` reads it.

transformers runs IQuest-Coder as Llama (``LlamaForCausalLM`` on an
``IQuestCoderConfig``): ``attention_bias`` covers q/k/v and o_proj, ``mlp_bias``
the MLP, RoPE as Llama's. What the family adds is its config class: defaults
``head_dim`` 128 (null: hidden_size / num_attention_heads), 8 KV heads (null: one
per query head), 131072 positions, eps 1e-5, untied embeddings, bos 1, eos 2, and
refusals of ``clip_qkv``, ``use_sliding_window`` and a hidden_size that the heads do
not divide, which transformers refuses too (the original code's options, unused by
any released checkpoint). Tensor names are Llama's: the shared decoder loads them as
they are, LoRA adapters, fp8 checkpoints and tensor parallelism included.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, with transformers' IQuestCoderConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 76800, "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 80,
           "num_attention_heads": 40, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": None,
           "rope_parameters": None, "rope_scaling": None, "partial_rotary_factor": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "attention_bias": False, "mlp_bias": False}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    hidden, heads = int(out["hidden_size"]), int(out["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}), "
                         "which IQuestCoderConfig refuses")
    for key, unset in (("clip_qkv", None), ("use_sliding_window", False)):
        if cfg.get(key, unset) not in (unset, None, False):
            raise ValueError(f"{key} is not supported for IQuest-Coder (transformers refuses it too)")
    head_dim, kv_heads = cfg.get("head_dim", 128), cfg.get("num_key_value_heads", 8)
    return {**out, "head_dim": int(head_dim) if head_dim is not None else hidden // heads,
            "num_key_value_heads": int(kv_heads) if kv_heads is not None else heads}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    return FamilyOptions(hidden_act=family_activation(cfg, "iquestcoder"))


DIALECT = Dialect(architectures=("IQuestCoderForCausalLM",), llama_keys=llama_keys, options=options)
