"""OpenAI GPT (GPT-1, ``OpenAIGPTLMHeadModel``): its config.json in the
Llama-style keys.

transformers' OpenAIGPTConfig: ``n_embd``, ``n_layer``, ``n_head``,
``n_positions`` (512, the learned position table's rows), ``afn``
(``gelu``, which GPT-1 computes as the tanh approximation, gelu_new;
``relu``, ``silu``, ``swish``), ``layer_norm_epsilon`` (1e-5),
``tie_word_embeddings`` (true), no bos/eos; the MLP is 4 * n_embd wide,
every projection has a bias, one KV head per query head, scores scaled by
1 / sqrt(head_dim). Each block norms after its residual add
(``ln_1(x + attn(x))``, ``ln_2(. + mlp(.))``), with no final norm. The
model is ``splitserve.engine.models.openai_gpt``.

Refused: fp8 checkpoints (Conv1D weights are transposed and c_attn split at
load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# GPT-1's ACT_FNS (its "gelu" is gelu_new) as the plain MLP's activations
_ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
_PASSED = {"bos_token_id": None, "eos_token_id": None, "torch_dtype": None, "dtype": None}


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "n_embd", "hidden_size"))
    heads = int(required(cfg, "n_head", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"n_embd ({hidden}) must be a multiple of n_head ({heads})")
    return {
        "vocab_size": required(cfg, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": required(cfg, "n_layer", "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": cfg.get("n_positions", cfg.get("max_position_embeddings", 512)),
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
        **passed_keys(cfg, _PASSED),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "OpenAI GPT", "Conv1D weights are transposed and c_attn split at load")
    afn = cfg.get("afn") or "gelu"
    if afn not in _ACTIVATIONS:
        raise ValueError(f"afn {afn!r} is not supported for openai-gpt; supported: "
                         f"{', '.join(_ACTIVATIONS)}")
    return FamilyOptions(
        hidden_act=_ACTIVATIONS[afn],
        layer_norm=True,
        plain_mlp=("c_fc", "c_proj"),
        position_table="model.embed_positions",
        norm_after_block=True,
        final_norm=False,
    )


DIALECT = Dialect(architectures=("OpenAIGPTLMHeadModel",), llama_keys=llama_keys, options=options)
