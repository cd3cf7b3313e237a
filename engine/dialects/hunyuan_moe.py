"""HunYuan MoE V1 (``HunYuanMoEV1ForCausalLM``): its config.json in Llama's
keys, and its ``FamilyOptions``.

As transformers' HunYuanMoEV1Config and its model read it: HunYuan dense's
decoder (``splitserve.engine.dialects.hunyuan``: per-head q/k norms after
RoPE, ``attention_bias`` on q/k/v and o_proj, ``head_dim`` required, its
"dynamic" ``alpha`` RoPE base) with a sparse MLP in every layer:

- ``num_experts`` (1) bias-free SwiGLU experts of ``intermediate_size``,
  ``moe_topk`` (1) per token, routed by a float32 router (``mlp.gate.wg``):
  softmax over the logits, the top k, renormalised to sum to one;
- ``mlp.shared_mlp``: one ungated, bias-free MLP of ``intermediate_size``
  every token runs, added to the routed experts' output.

``num_experts`` and ``moe_topk`` may be per-layer lists, as transformers
reads them, when every layer has the same value. Refused: lists that differ
by layer, activations other than SiLU, fp8 checkpoints (norm and router
tensors are renamed at load), tensor parallelism (untested).
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, refuse_fp8_checkpoint
from splitserve.engine.dialects.hunyuan import llama_keys as dense_llama_keys
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions


def _per_layer(cfg: dict[str, Any], key: str, num_layers: int) -> int:
    """``key`` (default 1) as one integer; a list must give every layer the same."""
    value = cfg.get(key, 1)
    value = 1 if value is None else value
    if isinstance(value, list):
        if len(value) != num_layers or len(set(value)) != 1:
            raise ValueError(f"{key} {value} differs by layer (or is not one entry per layer); only "
                             "the same value in every layer is supported for hunyuan_v1_moe")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer for hunyuan_v1_moe, got {value!r}")
    return value


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    out = dense_llama_keys(cfg)
    layers, expert_size = int(out["num_hidden_layers"]), int(out["intermediate_size"])
    out.update(num_experts=_per_layer(cfg, "num_experts", layers),
               num_experts_per_tok=_per_layer(cfg, "moe_topk", layers),
               moe_intermediate_size=expert_size, norm_topk_prob=True,
               shared_expert_intermediate_size=expert_size)
    return out


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, "HunYuanMoEV1ForCausalLM", "q/k norm and router tensors are renamed at load")
    return FamilyOptions(hidden_act=checked_activation(cfg, "hunyuan_v1_moe"), qk_norm_after_rope=True,
                         tensor_parallel_refusal="its experts and float32 router (HunYuan MoE) are "
                                                 "untested across ranks")


DIALECT = Dialect(architectures=("HunYuanMoEV1ForCausalLM",), llama_keys=llama_keys, options=options)
