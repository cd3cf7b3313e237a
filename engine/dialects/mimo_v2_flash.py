"""MiMo-V2-Flash (``MiMoV2FlashForCausalLM``): its config.json in Llama's keys,
and its ``FamilyOptions``, as transformers' ``MiMoV2FlashConfig`` and its model
read them.

- ``layer_types``: each layer ``sliding_attention`` (a window of
  ``sliding_window`` tokens, default 129; a hub ``sliding_window_size`` w
  means w + 1) or ``full_attention``; by default layer 0 and every 6th
  layer attend to all, the rest slide;
- the full layers have ``num_key_value_heads`` (4) KV heads, the sliding
  ones twice as many and a learned sink per query head
  (``self_attn.sinks``; the hub's ``attention_sink_bias``);
- queries and keys of ``head_dim`` (192), values of ``v_head_dim`` (128)
  multiplied by ``attention_value_scale`` (0.707; null: 1); scores scaled
  by head_dim ** -0.5; q/k/v biases with ``attention_bias``, none on o_proj;
- RoPE (rotate-half) on each head's first int(head_dim *
  ``partial_rotary_factor``) dims, with a base per layer type
  (``rope_parameters`` nested by layer type; without it 5e6 for the full
  layers, 1e4 for the sliding ones, factor 0.334: transformers ignores a
  top-level ``rope_theta``);
- ``mlp_layer_types``: each layer's MLP, ``dense`` (``intermediate_size``)
  or ``sparse`` (by default layer 0 dense): ``n_routed_experts`` (256)
  experts of ``moe_intermediate_size`` (2048), ``num_experts_per_tok`` (8)
  per token, chosen by the grouped sigmoid router with its correction bias
  (``n_group``, ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``,
  null: 1), no shared experts;
- RMSNorm (eps 1e-5) before attention and MLP, untied embeddings.

Multi-token-prediction weights (``model.mtp.*``) are skipped at load, as
transformers skips them. Refused: RoPE types other than the default, layer
types whose rotary widths differ, values wider than the keys, query heads
that the sliding layers' KV heads do not divide, activations other than
SiLU, fp8 checkpoints, tensor parallelism (the layers' KV head counts
differ) and LoRA adapters.
"""

from __future__ import annotations

from typing import Any

from splitserve.engine.dialects import Dialect, passed_keys, refuse_fp8_checkpoint
from splitserve.engine.dialects.glm4_moe import moe_keys
from splitserve.engine.dialects.glm4_moe_lite import mlp_layer_types
from splitserve.engine.dialects.moe_keys import checked_activation
from splitserve.engine.family_config import FamilyOptions, checked_layer_types
from splitserve.engine.mimo_v2_config import MiMoV2Shape

ARCH = "MiMoV2FlashForCausalLM"
# transformers' MiMoV2FlashConfig defaults, where config.json has no such key
_DEFAULTS = {"vocab_size": 152576, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 48,
             "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 192, "v_head_dim": 128,
             "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
             "attention_bias": False, "n_routed_experts": 256, "num_experts_per_tok": 8,
             "moe_intermediate_size": 2048, "n_group": 1, "topk_group": 1, "norm_topk_prob": True}
# keys read as Llama's, as written (None: absent stays absent)
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "torch_dtype",
           "dtype", "bos_token_id", "eos_token_id")
DEFAULT_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334}}
DEFAULT_WINDOW = 129
DEFAULT_VALUE_SCALE = 0.707


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {**_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:
        out["n_routed_experts"] = cfg["num_local_experts"]  # attribute_map's other name
    out["routed_scaling_factor"] = float(cfg.get("routed_scaling_factor") or 1.0)  # null: 1
    out["n_shared_experts"], out["first_k_dense_replace"] = 0, None  # mlp_layer_types says
    return out


def window(cfg: dict[str, Any]) -> int:
    """The sliding layers' window: ``sliding_window_size`` + 1 where given, else
    ``sliding_window`` (129 when absent)."""
    if cfg.get("sliding_window_size") is not None:
        value = int(cfg["sliding_window_size"]) + 1
    else:
        value = cfg.get("sliding_window", DEFAULT_WINDOW)
    if value is None or int(value) <= 0:
        raise ValueError(f"sliding_window must be a positive number of tokens, got {value!r}")
    return int(value)


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """``layer_types``, or as MiMoV2FlashConfig fills them: layer 0 and every 6th full."""
    n = int(cfg.get("num_hidden_layers") or _DEFAULTS["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = ["full_attention" if i == 0 or not (i + 1) % 6 else "sliding_attention" for i in range(n)]
    return checked_layer_types(types, n, "mimo_v2_flash")


def layer_ropes(cfg: dict[str, Any]) -> tuple[tuple[float, ...], int]:
    """(each layer's RoPE base, the rotated dims of every head)."""
    full = _with_defaults(cfg)
    rope = cfg.get("rope_parameters") or DEFAULT_ROPE
    head_dim, types = int(full["head_dim"]), layer_types(cfg)
    thetas, dims = {}, set()
    for kind in sorted(set(types)):
        params = rope.get(kind) if isinstance(rope, dict) else None
        if not isinstance(params, dict) or params.get("rope_theta") is None:
            raise ValueError(f"rope_parameters must hold a dict with rope_theta for each layer type "
                             f"({kind} has none): transformers' {ARCH} reads them by layer type")
        kind_name = params.get("rope_type") or params.get("type") or "default"
        if kind_name != "default":
            raise ValueError(f"rope_parameters[{kind!r}] rope_type {kind_name!r} is not supported for "
                             f"{ARCH}; supported: default")
        thetas[kind] = float(params["rope_theta"])
        dims.add(int(head_dim * float(params.get("partial_rotary_factor", 0.334))))
    if len(dims) != 1 or min(dims) <= 0 or min(dims) % 2:
        raise ValueError(f"partial_rotary_factor must give every layer type the same even, positive "
                         f"number of rotated dims of head_dim {head_dim}, got {sorted(dims)}")
    return tuple(thetas[t] for t in types), dims.pop()


def llama_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    full = _with_defaults(cfg)
    types = layer_types(cfg)
    kv = int(full["num_key_value_heads"])
    thetas, _ = layer_ropes(cfg)
    moe = moe_keys(full, "mimo_v2_flash", first_dense=0, norm_topk=True)
    moe["mlp_only_layers"] = [i for i, t in enumerate(mlp_layer_types(full)) if t == "dense"]
    bias, sliding = bool(full["attention_bias"]), "sliding_attention" in types
    return {**passed_keys(full, {k: None for k in _COPIED}), **moe,
            # the cache's KV heads: the sliding layers' (twice the full layers')
            "num_key_value_heads": 2 * kv if sliding else kv,
            "rope_parameters": {"rope_type": "default", "rope_theta": thetas[0]},
            "attention_bias": bias, "attention_out_bias": False, "mlp_bias": False,
            "use_sliding_window": sliding, "sliding_window": window(cfg) if sliding else None,
            "layer_types": types}


def options(cfg: dict[str, Any]) -> FamilyOptions:
    refuse_fp8_checkpoint(cfg, ARCH, "untested: the float32 router and the sinks beside fp8 projections")
    full = _with_defaults(cfg)
    heads, kv = int(full["num_attention_heads"]), int(full["num_key_value_heads"])
    head_dim, v_head_dim = int(full["head_dim"]), int(full["v_head_dim"])
    if kv <= 0 or heads % (2 * kv):
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of twice num_key_value_heads "
                         f"({kv}): the sliding layers have {2 * kv} KV heads")
    if not 0 < v_head_dim <= head_dim:
        raise ValueError(f"v_head_dim ({v_head_dim}) must be in [1, head_dim ({head_dim})]: the values "
                         "are zero-padded to the keys' width in the cache")
    scale = cfg.get("attention_value_scale", DEFAULT_VALUE_SCALE)
    thetas, rotary = layer_ropes(cfg)
    mlp_layer_types(full)
    return FamilyOptions(
        hidden_act=checked_activation(full, "mimo_v2_flash"), rotary_dim=rotary, layer_rope_thetas=thetas,
        tensor_parallel_refusal="its layers of different KV head counts (MiMo-V2-Flash) are not split "
                                "across ranks",
        mimo_v2=MiMoV2Shape(kv_heads=kv, v_head_dim=v_head_dim,
                            value_scale=1.0 if scale is None else float(scale)))


DIALECT = Dialect(architectures=(ARCH,), llama_keys=llama_keys, options=options)
