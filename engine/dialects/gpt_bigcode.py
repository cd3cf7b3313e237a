"""GPT-BigCode (``GPTBigCodeForCausalLM``: StarCoder 1, SantaCoder): its
config.json in the Llama-style keys.

transformers' GPTBigCodeConfig uses GPT-2's keys (``n_embd``, ``n_layer``,
``n_head``, ``n_inner``, ``n_positions``, ``layer_norm_epsilon``, tied
embeddings, bos/eos 50256), read by ``splitserve.engine.dialects.gpt2``;
its activation defaults to ``gelu_pytorch_tanh``. ``multi_query`` (default
on) gives one KV head for all query heads, else one per query head; every
projection has a bias. The model (``splitserve.engine.models.gpt_bigcode``)
is GPT-2's with nn.Linear weights and the fused ``c_attn`` split by KV head.

Scores are scaled by ``1 / sqrt(head_dim)``, not at all with
``scale_attn_weights: false``. ``attention_softmax_in_fp32`` and
``scale_attention_softmax_in_fp32`` only say where a half-precision run
upcasts (transformers 5 reads neither beyond storing them): the engine's
scores and softmax are float32 anyway, so both are accepted. Refused:
``add_cross_attention`` (an encoder-decoder's cross-attention) and fp8
checkpoints (``c_attn`` is split at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, gpt2, plain_activation, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = gpt2.llama_keys(cfg)
    # GPTBigCodeAttention: one KV head with multi_query, whatever num_key_value_heads says
    keys["num_key_value_heads"] = 1 if cfg.get("multi_query", True) else keys["num_attention_heads"]
    return keys


def options(cfg: dict[str, Any]) -> FamilyOptions:
    if cfg.get("add_cross_attention"):
        raise ValueError("add_cross_attention (GPT-BigCode as an encoder-decoder's decoder) is not "
                         "supported")
    refuse_fp8_checkpoint(cfg, "GPT-BigCode", "c_attn is split at load")
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "gpt_bigcode", "gelu_pytorch_tanh"),
        layer_norm=True,
        plain_mlp=("c_fc", "c_proj"),
        attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
        position_table="model.embed_positions",
    )


DIALECT = Dialect(architectures=("GPTBigCodeForCausalLM",), llama_keys=llama_keys, options=options)
