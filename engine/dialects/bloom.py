"""Bloom (``BloomForCausalLM``): its config.json in the Llama-style keys.

transformers' BloomConfig: ``hidden_size`` (older ``n_embed``), ``n_layer``,
``n_head`` (one KV head per query head, each hidden_size / n_head wide),
``layer_norm_epsilon`` (1e-5), ``tie_word_embeddings`` (on), bos 1, eos 2,
vocab 250880. Every projection has a bias; the MLP is 4 * hidden_size wide
with Bloom's tanh-approximated GELU (``bloom_gelu_forward``: the formula of
``gelu_tanh``). Positions enter through ALiBi alone, so config.json names
no context length: ``seq_length`` when written (Megatron exports), else
2048, BLOOM's training length, bounds the served context.

``apply_residual_connection_post_layernorm`` (each block's residual is its
normed input) is implemented (``FamilyOptions.residual_after_norm``,
splitserve.engine.models.bloom). ``pretraining_tp`` alone changes nothing
at inference. Refused: ``slow_but_exact`` with ``pretraining_tp`` > 1
(transformers then computes the attention and MLP output projections in
slices whose sum leaves out their biases) and fp8 checkpoints
(``query_key_value`` is split at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys read as they are, with transformers' BloomConfig defaults
_PASSED = {"bos_token_id": 1, "eos_token_id": 2, "torch_dtype": None, "dtype": None,
           "vocab_size": 250880}
DEFAULT_CONTEXT = 2048  # BLOOM's training sequence length


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(required(cfg, "hidden_size", "n_embed"))
    heads = int(required(cfg, "n_head", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of n_head ({heads})")
    tied = cfg.get("tie_word_embeddings")
    return {
        **passed_keys(cfg, _PASSED),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": int(required(cfg, "n_layer", "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": int(cfg.get("seq_length") or DEFAULT_CONTEXT),
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon") or 1e-5),
        "tie_word_embeddings": True if tied is None else bool(tied),
        "attention_bias": True,
        "attention_out_bias": True,
        "mlp_bias": True,
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    if cfg.get("slow_but_exact") and int(cfg.get("pretraining_tp") or 1) > 1:
        raise ValueError("slow_but_exact with pretraining_tp > 1 is not supported for bloom "
                         "(transformers' sliced output projections leave out their biases)")
    refuse_fp8_checkpoint(cfg, "bloom", "query_key_value is split at load")
    return FamilyOptions(hidden_act="gelu_tanh", layer_norm=True,
                         plain_mlp=("dense_h_to_4h", "dense_4h_to_h"), alibi="bloom",
                         residual_after_norm=bool(cfg.get("apply_residual_connection_post_layernorm")))


DIALECT = Dialect(architectures=("BloomForCausalLM",), llama_keys=llama_keys, options=options)
