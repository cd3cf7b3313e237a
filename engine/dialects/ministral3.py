"""Ministral 3 (``Ministral3ForCausalLM``): its config.json in Llama's keys and
its ``FamilyOptions``, as transformers' ``Ministral3Config`` and its model read them.

Mistral's decoder (no biases, SiLU by default, a window of ``sliding_window``
tokens on every layer while one is set, none by default) whose queries, once
rotated, are multiplied by ``1 + llama_4_scaling_beta * log(1 + floor(position /
original_max_position_embeddings))`` (both read from ``rope_parameters``:
``FamilyOptions.query_position_beta`` / ``query_position_length``). Where config.json
has no rope dict, Ministral3Config's: YaRN (factor 16 over 16384 positions, base
1e6, ``mscale`` and ``mscale_all_dim`` 1) with a beta of 0.1. Defaults: ``head_dim``
128 (null: hidden_size / num_attention_heads), 8 KV heads, 262144 positions, eps
1e-5, untied embeddings, bos 1, eos 2. Tensor names are Llama's: the shared decoder
loads them as they are, LoRA adapters, fp8 checkpoints and tensor parallelism included.

``Mistral3ForConditionalGeneration`` (model_type mistral3, how the hub ships Ministral
3 with its vision tower): its ``text_config`` is read (dtype and quantization_config
from the top level where it has none), its embeddings tied by the wrapper's own
``tie_word_embeddings`` (default true; the text config's is not read), as
transformers ties them.
Refused: a rope dict without ``llama_4_scaling_beta`` or (for RoPE without scaling)
``original_max_position_embeddings``, which transformers' attention cannot run without;
a wrapper whose text model is not Ministral 3's (model_type ministral3: Mistral Small
3.x's is Mistral's), and fp8 wrapped checkpoints (renamed at load; ``weight_dtype:
fp8`` quantizes at load instead).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import (Dialect, passed_keys, refuse_fp8_checkpoint,
                                        refuse_partial_rotary, wrapped_text_config)
from splitserve.engine.family_config import FamilyOptions, family_activation

WRAPPED = "Mistral3ForConditionalGeneration"
# keys read as Llama's, with transformers' Ministral3Config defaults (None: left out when absent)
_PASSED = {"vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 34,
           "num_attention_heads": 32, "max_position_embeddings": 262144, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "rope_theta": None}
_SCALED_ROPE = ("llama3", "yarn", "longrope")  # the kinds whose pretraining length transformers fills in


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: the wrapper's ``text_config`` (its dtype and
    quantization_config from the top level where it has none, the wrapper's tie), else
    config.json itself."""
    text = wrapped_text_config(cfg, DIALECT.architectures, WRAPPED)
    if text is None:
        return cfg
    if text.get("model_type") != "ministral3":
        raise ValueError(f"{WRAPPED} with a text model of model_type {text.get('model_type')!r} is not "
                         "supported; only Ministral 3's (ministral3)")
    refuse_fp8_checkpoint(text, WRAPPED, "its tensors are renamed at load")
    return {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}


def rope_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json's rope dict (``rope_parameters``, or the older ``rope_scaling``), else
    Ministral3Config's default one."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if rope is None:
        return {"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                "llama_4_scaling_beta": 0.1}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be an object, got {rope!r}")
    return dict(rope)


def query_scaling(cfg: dict[str, Any]) -> tuple[float, int]:
    """(beta, length) of the queries' position scaling, where transformers' attention
    reads them: the rope dict after ``standardize_rope_params``, which gives the scaled
    kinds max_position_embeddings where the dict has no length (a top-level
    ``original_max_position_embeddings`` is not Ministral3Config's and is ignored)."""
    rope = rope_dict(cfg)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    length = rope.get("original_max_position_embeddings")
    if kind in _SCALED_ROPE and length is None:
        length = cfg.get("max_position_embeddings", 262144)
    beta = rope.get("llama_4_scaling_beta")
    if beta is None or length is None:
        missing = "llama_4_scaling_beta" if beta is None else "original_max_position_embeddings"
        raise ValueError(f"Ministral 3's rope_parameters needs {missing} (transformers' Ministral3Attention "
                         "scales the queries by it)")
    if int(length) <= 0:
        raise ValueError(f"original_max_position_embeddings must be positive, got {length!r}")
    return float(beta), int(length)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = text_config(cfg)
    rope = rope_dict(cfg)
    refuse_partial_rotary(cfg, rope, "ministral3")
    heads = int(cfg.get("num_attention_heads", 32))
    head_dim = cfg.get("head_dim", 128)
    kv_heads = cfg.get("num_key_value_heads", 8)
    window = cfg.get("sliding_window")
    out = passed_keys(cfg, _PASSED)
    return {**out, "rope_parameters": rope,
            "head_dim": int(head_dim) if head_dim is not None else int(out["hidden_size"]) // heads,
            "num_key_value_heads": int(kv_heads) if kv_heads is not None else heads,
            "attention_bias": False, "attention_out_bias": False, "mlp_bias": False,
            # Mistral's window: every layer, while one is set
            "use_sliding_window": window is not None, "sliding_window": window,
            "layer_types": ["sliding_attention"] * int(out["num_hidden_layers"])}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    cfg = text_config(cfg)
    beta, length = query_scaling(cfg)
    return FamilyOptions(hidden_act=family_activation(cfg, "ministral3"), query_position_beta=beta,
                         query_position_length=length)


DIALECT = Dialect(architectures=("Ministral3ForCausalLM", WRAPPED), llama_keys=llama_keys, options=options)
