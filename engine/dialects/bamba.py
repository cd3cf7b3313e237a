"""Bamba (``BambaForCausalLM``, transformers' ``bamba``): its config.json in
Llama's keys, and its ``FamilyOptions``.

As transformers' BambaConfig and its model read it:

- ``attn_layer_indices``: the attention layers; every other layer is a
  Mamba-2 layer (``splitserve.engine.models.mamba2``) of the ``mamba_*`` keys
  (defaults as Granite 4.0-H's, ``splitserve.engine.dialects.mamba2_keys``);
- attention: Llama's, q/k/v/o biases by ``attention_bias``, RoPE over
  ``partial_rotary_factor`` of each head: the rope dict's, else 0.5 (the
  config class sets it whatever a top-level key says);
- every layer a SwiGLU ``feed_forward`` (biases by ``mlp_bias``) behind
  ``pre_ff_layernorm``; the final norm ``model.final_layernorm``;
  ``rms_norm_eps`` 1e-5.

Refused: a model without attention layers, activations other than SiLU,
fp8 checkpoints (the Mamba-2 projections are not read in fp8), tensor
parallelism (the Mamba-2 layers are not sharded). LoRA adapters apply to
the attention projections, the ``feed_forward`` MLPs and the Mamba-2
mixers' ``in_proj`` / ``out_proj``. A hybrid model's engine caches prefixes
with state checkpoints.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.mamba2_keys import checked_kinds, hybrid_layout, mamba2_shape
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.dialects.qwen3_next import rotary_dim
from splitserve.engine.family_config import FamilyOptions

ARCH = "BambaForCausalLM"
# keys read as Llama's, with transformers' BambaConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 128000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
           "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "rope_parameters": None, "rope_scaling": None,
           "rope_theta": None, "torch_dtype": None, "dtype": None, "quantization_config": None,
           "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_ROTARY_FACTOR = 0.5


def layer_kinds(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    attends = set(cfg.get("attn_layer_indices") or ())
    outside = sorted(i for i in attends if not 0 <= int(i) < num_layers)
    if outside:
        raise ValueError(f"attn_layer_indices {outside} are not layers of {num_layers}")
    types = ["full_attention" if i in attends else "mamba" for i in range(num_layers)]
    return checked_kinds(types, num_layers, "attn_layer_indices")


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    out.update(qk_norm=False, attention_out_bias=bool(out["attention_bias"]))  # o_proj's, as q/k/v's
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "its Mamba-2 projections are not read in fp8")
    merged = {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}
    kinds = layer_kinds(cfg, int(merged["num_hidden_layers"]))
    shape = mamba2_shape(cfg, int(merged["hidden_size"]))
    head_dim = int(merged.get("head_dim") or int(merged["hidden_size"]) // int(merged["num_attention_heads"]))
    return FamilyOptions(
        hidden_act=checked_activation(cfg, "bamba"), final_norm_name="model.final_layernorm",
        rotary_dim=rotary_dim({**cfg, "partial_rotary_factor": DEFAULT_ROTARY_FACTOR}, head_dim),
        hybrid=hybrid_layout(kinds, shape), mamba2=shape,
        tensor_parallel_refusal="bamba's recurrent (Mamba-2) layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
