"""MPT (``MptForCausalLM``): its config.json in the Llama-style keys.

transformers' MptConfig: ``d_model``, ``n_heads`` (one KV head per query
head, each d_model / n_heads wide), ``n_layers``, ``max_seq_len`` (2048:
the served context; transformers' ALiBi table has this many columns),
``layer_norm_epsilon`` (1e-5), ``vocab_size`` (50368),
``tie_word_embeddings`` (on), no bos/eos. transformers' ``MptForCausalLM``
builds no biases at all (``Wqkv``, ``out_proj``, the MLP's ``up_proj`` /
``down_proj``, and LayerNorms with a weight only), an exact-GELU MLP 4 *
d_model wide, and ALiBi with ``build_mpt_alibi_tensor``'s slopes at its
default ``alibi_bias_max`` of 8. Of ``attn_config`` it reads
``softmax_scale`` (None: 1 / sqrt(head_dim)) and ``clip_qkv`` (q, k and v
clamped to +-clip_qkv; 0 or None: none), both implemented.

Refused, as settings transformers' MptForCausalLM would not honour:
``no_bias`` false, ``expansion_ratio`` other than 4, ``logit_scale``, and
in ``attn_config`` ``alibi`` false, ``alibi_bias_max`` other than 8,
``attn_type`` other than multihead_attention, ``qk_ln``, ``prefix_lm``,
``rope`` and a ``sliding_window_size``; fp8 checkpoints too (``Wqkv`` is
split at load). Read as transformers ignores them: ``learned_pos_emb``
(no position table next to ALiBi), ``attn_uses_sequence_id`` (training's
packed sequences), ``norm_type``, ``attn_impl``, ``embedding_fraction``.
"""

from __future__ import annotations

from typing import Any, Callable

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys read as they are, with transformers' MptConfig defaults
_PASSED = {"bos_token_id": None, "eos_token_id": None, "torch_dtype": None, "dtype": None,
           "vocab_size": 50368}
# attn_config key -> (whether its value is one transformers honours, what it asks for)
_ATTN_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "alibi": (lambda v: v is None or bool(v), "learned positions in place of ALiBi"),
    "alibi_bias_max": (lambda v: v is None or float(v) == 8, "ALiBi slopes other than at 8"),
    "attn_type": (lambda v: v in (None, "multihead_attention"), "fewer KV heads than query heads"),
    "qk_ln": (lambda v: not v, "LayerNorm on q and k"),
    "prefix_lm": (lambda v: not v, "bidirectional attention over a prefix"),
    "rope": (lambda v: not v, "RoPE"),
    "sliding_window_size": (lambda v: v is None or int(v) < 0, "a sliding window"),
}


def _attn_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("attn_config") or {}


def _heads(cfg: dict[str, Any]) -> tuple[int, int]:
    hidden = int(required(cfg, "d_model", "hidden_size"))
    heads = int(required(cfg, "n_heads", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"d_model ({hidden}) must be a multiple of n_heads ({heads})")
    return hidden, heads


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = _heads(cfg)
    tied = cfg.get("tie_word_embeddings")
    return {
        **passed_keys(cfg, _PASSED),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": int(required(cfg, "n_layers", "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": int(cfg.get("max_seq_len") or 2048),
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon") or 1e-5),
        "tie_word_embeddings": True if tied is None else bool(tied),
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    attn = _attn_config(cfg)
    for key, (honoured, what) in _ATTN_REFUSED.items():
        if not honoured(attn.get(key)):
            raise ValueError(f"attn_config.{key} {attn[key]!r} ({what}) is not supported for mpt: "
                             "transformers' MptForCausalLM does not implement it")
    if cfg.get("no_bias") is False:
        raise ValueError("no_bias false (biases on MPT's projections and norms) is not supported: "
                         "transformers' MptForCausalLM builds none")
    if int(cfg.get("expansion_ratio") or 4) != 4:
        raise ValueError(f"expansion_ratio {cfg['expansion_ratio']} is not supported for mpt: "
                         "transformers' MptForCausalLM builds its MLP 4 x d_model wide")
    if cfg.get("logit_scale") is not None:
        raise ValueError(f"logit_scale {cfg['logit_scale']!r} is not supported for mpt: "
                         "transformers' MptForCausalLM does not apply it")
    refuse_fp8_checkpoint(cfg, "mpt", "Wqkv is split at load")
    scale, clip = attn.get("softmax_scale"), attn.get("clip_qkv")
    return FamilyOptions(hidden_act="gelu", float_layer_norm="weight", plain_mlp=("up_proj", "down_proj"),
                         alibi="bloom", attn_scale=None if scale is None else float(scale),
                         clip_qkv=float(clip) if clip else None)


DIALECT = Dialect(architectures=("MptForCausalLM",), llama_keys=llama_keys, options=options)
