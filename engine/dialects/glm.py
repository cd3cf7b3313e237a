"""GLM (``GlmForCausalLM``, GLM-4 9B and kin): its config.json in Llama's
keys, and its ``FamilyOptions``.

As transformers' GlmConfig reads it: ``partial_rotary_factor`` (in
``rope_parameters`` or at top level, default 0.5) of each head's dims
rotate, in adjacent pairs (``splitserve.engine.models.glm``);
``attention_bias`` (default on) covers q/k/v only, o_proj and the MLP have
none; defaults ``head_dim`` 128, 2 KV heads, eps 1.5625e-7, untied
embeddings. fp8 checkpoints are refused: their fused gate_up_proj and
reordered q/k rows are not handled for fp8 scales.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.family_config import FamilyOptions, family_activation

# keys read as Llama's, as written
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "rope_theta", "rope_parameters", "rope_scaling", "torch_dtype", "dtype", "bos_token_id")
# transformers' GlmConfig defaults, where config.json has no such key
_DEFAULTS = {"head_dim": 128, "num_key_value_heads": 2, "rms_norm_eps": 1.5625e-7,
             "max_position_embeddings": 131072, "eos_token_id": [151329, 151336, 151338],
             "attention_bias": True, "tie_word_embeddings": False}
DEFAULT_ROTARY_FACTOR = 0.5


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: cfg[k] for k in _COPIED if k in cfg}
    out.update({k: cfg.get(k, default) for k, default in _DEFAULTS.items()})
    out["attention_out_bias"] = False
    return out


def rotary_dim(cfg: dict[str, Any], default_head_dim: int | None = _DEFAULTS["head_dim"]) -> int | None:
    """How many of each head's dims rotate (``partial_rotary_factor``, 0.5
    when absent); None: all of them. ``default_head_dim``: the config class's
    head_dim when config.json has no such key (None: hidden_size / heads)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    rope = rope if isinstance(rope, dict) else {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    factor = DEFAULT_ROTARY_FACTOR if factor is None else float(factor)
    head_dim = cfg.get("head_dim", default_head_dim)
    head_dim = int(head_dim or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotated dims of {head_dim}; "
                         "an even number in (0, head_dim] is needed")
    return None if dim == head_dim else dim


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "GlmForCausalLM", "fused gate_up_proj, q/k rows reordered at load")
    return FamilyOptions(hidden_act=family_activation(cfg, "glm"), interleaved_rope=True,
                         rotary_dim=rotary_dim(cfg))


DIALECT = Dialect(architectures=("GlmForCausalLM",), llama_keys=llama_keys, options=options)
