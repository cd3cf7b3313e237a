"""Falcon (``FalconForCausalLM``): its config.json in the Llama-style keys.

transformers' FalconConfig: ``hidden_size`` (older ``n_embed``),
``num_attention_heads`` (older ``n_head``), ``num_hidden_layers`` (older
``n_layer``), ``num_kv_heads`` (default: one per query head),
``ffn_hidden_size`` (None: 4 * hidden_size), ``layer_norm_epsilon`` (1e-5),
``activation`` (``gelu``), ``bias`` (every Linear, default off),
``tie_word_embeddings`` (on), RoPE by ``rope_theta`` / ``rope_parameters``
over whole heads of hidden_size / num_attention_heads dims.

The layer's shape, as ``FalconDecoderLayer`` builds it:

- ``new_decoder_architecture`` (Falcon-40B/180B): ``num_kv_heads`` KV heads,
  attention and MLP in parallel on ``ln_attn`` and ``ln_mlp`` of the same
  input (``num_ln_in_parallel_attn`` 2, its default there), or both on
  ``input_layernorm`` (1);
- otherwise one KV head with ``multi_query`` (its default), else one per
  query head; ``parallel_attn`` (default) runs attention and MLP in parallel
  on ``input_layernorm``, without it they run one after the other, the MLP
  behind ``post_attention_layernorm``.

``alibi`` (Falcon-RW) replaces RoPE by ALiBi with Bloom's slopes, which
``FalconModel`` rounds to bfloat16 and divides by sqrt(head_dim)
(``FamilyOptions.alibi`` "falcon", splitserve.engine.models.alibi), in any
of these layouts.

Refused: the combinations transformers' own layer cannot run (the new
architecture without ``parallel_attn``; two norms in the old one),
``num_kv_heads`` other than the head count in the old architecture without
multi-query, and fp8 checkpoints (``query_key_value`` is split at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys read as they are, with transformers' FalconConfig defaults
_PASSED = {"bos_token_id": 11, "eos_token_id": 11, "torch_dtype": None, "dtype": None,
           "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
           "max_position_embeddings": 2048, "vocab_size": 65024}


def _shape(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(hidden_size, query heads, KV heads), as FalconAttention sizes them."""
    hidden = int(required(cfg, "hidden_size", "n_embed"))
    heads = int(required(cfg, "num_attention_heads", "n_head"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    kv = int(cfg.get("num_kv_heads") or heads)
    if cfg.get("new_decoder_architecture", False):
        return hidden, heads, kv
    if cfg.get("multi_query", True):
        return hidden, heads, 1
    if kv != heads:  # query_key_value holds q, k and v for every head
        raise ValueError(f"num_kv_heads ({kv}) must equal num_attention_heads ({heads}) when "
                         "neither new_decoder_architecture nor multi_query is set")
    return hidden, heads, heads


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads, kv = _shape(cfg)
    bias = bool(cfg.get("bias", False))
    tied = cfg.get("tie_word_embeddings")
    return {
        **passed_keys(cfg, _PASSED),
        "hidden_size": hidden,
        "intermediate_size": int(cfg.get("ffn_hidden_size") or 4 * hidden),
        "num_hidden_layers": int(required(cfg, "num_hidden_layers", "n_layer")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon") or 1e-5),
        "tie_word_embeddings": True if tied is None else bool(tied),
        "attention_bias": bias,
        "attention_out_bias": bias,
        "mlp_bias": bias,
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "falcon", "query_key_value is split at load")
    act = plain_activation(cfg, "falcon", "gelu", key="activation")
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    parallel = bool(cfg.get("parallel_attn", True))
    norms = cfg.get("num_ln_in_parallel_attn")
    norms = int(norms) if norms is not None else (2 if new_arch else 1)
    if norms not in (1, 2):
        raise ValueError(f"num_ln_in_parallel_attn must be 1 or 2, got {norms}")
    if new_arch and not parallel:  # transformers' layer builds norms its forward never reads
        raise ValueError("new_decoder_architecture with parallel_attn false is not supported "
                         "(transformers' FalconDecoderLayer cannot run it)")
    if not new_arch and parallel and norms == 2:
        raise ValueError("num_ln_in_parallel_attn 2 without new_decoder_architecture is not "
                         "supported (transformers' FalconDecoderLayer cannot run it)")
    # sequential: DecoderLayer's input_layernorm and post_attention_layernorm;
    # parallel with two norms: ln_attn / ln_mlp, loaded as those two
    # (splitserve.engine.models.falcon)
    return FamilyOptions(hidden_act=act, layer_norm=True,
                         plain_mlp=("dense_h_to_4h", "dense_4h_to_h"),
                         parallel_residual=parallel, parallel_mlp_norm=parallel and norms == 2,
                         alibi="falcon" if cfg.get("alibi") else "")


DIALECT = Dialect(architectures=("FalconForCausalLM",), llama_keys=llama_keys, options=options)
