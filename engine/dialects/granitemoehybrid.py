"""IBM Granite 4.0-H (``GraniteMoeHybridForCausalLM``, transformers'
``granitemoehybrid``): its config.json in Llama's keys, and its
``FamilyOptions``.

As transformers' GraniteMoeHybridConfig and its model read it:

- ``layer_types`` (older name ``layers_block_type``): each layer ``mamba`` /
  ``linear_attention`` (a Mamba-2 layer, ``splitserve.engine.models.mamba2``,
  its state in the engine's recurrent-state store) or ``attention`` /
  ``full_attention``; without it every layer is a Mamba-2 layer, which is
  refused (no attention layer);
- Mamba-2: ``mamba_n_heads`` (128) heads of ``mamba_d_head`` ("auto":
  ``mamba_expand`` (2) x hidden_size over the heads), ``mamba_n_groups`` (1)
  groups of B and C of ``mamba_d_state`` (256), a convolution of
  ``mamba_d_conv`` (4) taps with a bias (``mamba_conv_bias``, true),
  in/out projection biases by ``mamba_proj_bias`` (false),
  ``time_step_limit`` ((0, inf)); its gated norm gates before normalising,
  over ``mamba_n_groups`` groups;
- Granite's four scalars (``embedding_multiplier``, ``attention_multiplier``,
  ``residual_multiplier``, ``logits_scaling``; 1.0 when absent) on every
  layer, Mamba-2 layers included;
- attention: RoPE only where ``position_embedding_type`` is "rope" (default
  none); q/k/v/o biases by ``attention_bias``;
- MLPs: GraniteMoeShared's experts (``num_local_experts`` (8) of
  ``intermediate_size``, top ``num_experts_per_tok`` (2)) beside a dense
  ``shared_mlp`` of ``shared_intermediate_size`` (1024) in every layer; with
  ``num_local_experts`` 0, the ``shared_mlp`` alone (Granite 4.0-H Micro).
  The shared MLP's size is read as the Llama-style ``intermediate_size``.

Refused: activations other than SiLU, partial rotary, fp8 checkpoints (fused
experts and shared MLP split at load), tensor parallelism (the Mamba-2
layers are not sharded). LoRA adapters apply to the attention projections,
the Mamba-2 mixers' ``in_proj`` / ``out_proj`` and the dense ``shared_mlp``'s
fused ``input_linear`` / ``output_linear`` (not to the experts). A hybrid
model's engine caches prefixes with state checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint, refuse_partial_rotary
from splitserve.engine.dialects.mamba2_keys import checked_kinds, hybrid_layout, mamba2_shape
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, parse_family_options

ARCH = "GraniteMoeHybridForCausalLM"
# keys read as Llama's, with transformers' GraniteMoeHybridConfig defaults (None: left out when absent)
_PASSED = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
           "rope_parameters": None, "rope_scaling": None, "rope_theta": None, "torch_dtype": None,
           "dtype": None, "quantization_config": None, "bos_token_id": 1, "eos_token_id": 2}
POSITION_TYPES = (None, "nope", "rope")


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**_PASSED, **{k: v for k, v in cfg.items() if v is not None}}


def layer_kinds(cfg: dict[str, Any]) -> tuple[str, ...]:
    num_layers = int(_merged(cfg)["num_hidden_layers"])
    key = "layer_types" if cfg.get("layer_types") is not None else "layers_block_type"
    types = cfg.get(key) or ["mamba"] * num_layers
    return checked_kinds(types, num_layers, key)


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = passed_keys(cfg, _PASSED)
    shared = int(cfg.get("shared_intermediate_size", 1024))
    if shared <= 0:
        raise ValueError(f"shared_intermediate_size {shared} is not supported (every layer has a shared_mlp)")
    experts = int(cfg.get("num_local_experts", 8) or 0)
    out.update(qk_norm=False, mlp_bias=False, intermediate_size=shared,
               attention_out_bias=bool(out["attention_bias"]))  # o_proj's, as q/k/v's
    if experts > 0:
        out.update(num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 2),
                   moe_intermediate_size=int(cfg.get("intermediate_size", 11008)), norm_topk_prob=True)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "fused experts and shared_mlp are split at load")
    refuse_partial_rotary(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, ARCH)
    position = cfg.get("position_embedding_type")
    if position not in POSITION_TYPES:
        raise ValueError(f"position_embedding_type {position!r} is not supported for {ARCH}; "
                         "supported: null, nope, rope")
    merged = _merged(cfg)
    kinds = layer_kinds(cfg)
    shape = mamba2_shape(cfg, int(merged["hidden_size"]))
    granite = parse_family_options({**merged, "hidden_act": "silu"}, "granite")  # the four scalars
    return dataclasses.replace(
        granite, hidden_act=checked_activation(cfg, "granitemoehybrid"),
        nope_layers=() if position == "rope" else tuple(range(len(kinds))),
        hybrid=hybrid_layout(kinds, shape), mamba2=shape,
        tensor_parallel_refusal="granitemoehybrid's recurrent (Mamba-2) layers are not sharded across ranks")


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
