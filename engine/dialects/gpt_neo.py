"""GPT-Neo (``GPTNeoForCausalLM``): its config.json in the Llama-style keys.

transformers' GPTNeoConfig: ``hidden_size``, ``num_layers``, ``num_heads``
(one KV head per query head, each hidden_size / num_heads wide),
``intermediate_size`` (None: 4 * hidden_size), ``max_position_embeddings``
(2048, the learned position table's rows), ``layer_norm_epsilon`` (1e-5),
``activation_function`` (``gelu_new``), ``tie_word_embeddings`` (true),
bos/eos 50256. q/k/v carry no bias, ``out_proj`` and the MLP do. Scores
are not scaled at all (no ``1 / sqrt(head_dim)``).

``attention_types`` ([[["global", "local"], 12]] by default) lists
[pattern, repeats] pairs whose expansion gives each layer's kind, as
``GPTNeoConfig.expand_attention_types_params`` does; an ``attention_layers``
list written in config.json (as ``save_pretrained`` writes the expansion)
overrides it, as it does in transformers. A local layer's mask
keeps key j for query i when ``i - window_size < j <= i`` (its
``tril(bias) ^ tril(bias, -window_size)``): ``window_size`` tokens, the
query's own included, which is the engine's sliding window of that size
(``layer_types`` / ``sliding_window``). The model
(``splitserve.engine.models.gpt_neo``) is GPT-2's with unfused nn.Linear
attention projections. Refused: layer kinds other than global and local,
a list of kinds whose length is not ``num_layers`` (transformers refuses
both), a window that is not positive on a model with local layers, and
fp8 checkpoints (tensors are renamed at load).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, plain_activation, refuse_fp8_checkpoint, required
from splitserve.engine.family_config import FamilyOptions

# config.json keys read as they are, with transformers' GPTNeoConfig defaults
_PASSED = {"bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": None, "dtype": None,
           "vocab_size": 50257, "max_position_embeddings": 2048}
_DEFAULT_ATTENTION_TYPES = [[["global", "local"], 12]]
_KINDS = {"global": "full_attention", "local": "sliding_attention"}


def _heads(cfg: dict[str, Any]) -> tuple[int, int]:
    """(hidden_size, num_heads), hidden_size a multiple of num_heads as GPTNeoSelfAttention requires."""
    hidden = int(required(cfg, "hidden_size"))
    heads = int(required(cfg, "num_heads", "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_heads ({heads})")
    return hidden, heads


def attention_layers(cfg: dict[str, Any], num_layers: int) -> list[str]:
    """Each layer's kind, "global" or "local": config.json's ``attention_layers``
    where it is written (GPTNeoConfig sets it after expanding, so it wins),
    else the expansion of ``attention_types``."""
    kinds = cfg.get("attention_layers")
    if kinds is None:
        types = cfg.get("attention_types")
        types = _DEFAULT_ATTENTION_TYPES if types is None else types
        try:
            kinds = [kind for pattern, repeats in types for _ in range(int(repeats)) for kind in pattern]
        except (TypeError, ValueError):
            raise ValueError(f"attention_types must be a list of [[kinds...], repeats] pairs, got "
                             f"{types!r}") from None
    unknown = sorted({str(k) for k in kinds} - set(_KINDS))
    if unknown:
        raise ValueError(f"attention_types {unknown} are not supported for gpt_neo; supported: "
                         "global, local")
    if len(kinds) != num_layers:
        raise ValueError(f"attention_types / attention_layers give {len(kinds)} layers for "
                         f"num_layers {num_layers}")
    return kinds


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden, heads = _heads(cfg)
    layers = int(required(cfg, "num_layers", "num_hidden_layers"))
    kinds = attention_layers(cfg, layers)
    window = int(cfg.get("window_size", 256)) if "local" in kinds else 0  # only local layers read it
    if "local" in kinds and window <= 0:
        raise ValueError(f"window_size must be positive, got {window}")
    inner = cfg.get("intermediate_size")
    return {
        **passed_keys(cfg, _PASSED),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden if inner is None else int(inner),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "attention_bias": False,
        "attention_out_bias": True,
        "mlp_bias": True,
        "use_sliding_window": True,
        "sliding_window": window,
        "layer_types": [_KINDS[k] for k in kinds],
    }


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "GPT-Neo", "its tensors are renamed at load")
    return FamilyOptions(
        hidden_act=plain_activation(cfg, "gpt_neo", "gelu_new"),
        layer_norm=True,
        plain_mlp=("c_fc", "c_proj"),
        attn_scale=1.0,  # GPTNeoSelfAttention._attn divides by nothing
        position_table="model.embed_positions",
    )


DIALECT = Dialect(architectures=("GPTNeoForCausalLM",), llama_keys=llama_keys, options=options)
